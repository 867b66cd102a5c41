"""Adapters that let other frameworks use zephyr models (each needs its own extra)."""
