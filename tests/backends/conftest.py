"""Shared fixtures for the backend tests."""
import numpy as np
import pytest

from zephyr.testing.blocks import random_blocks
from zephyr import quants
from zephyr.backend import Weight
from zephyr.quants import GGMLType


@pytest.fixture
def make_weight():
    """make_weight(type, shape, seed=0) -> a Weight of random, finite values."""
    def make(type, shape, seed=0, name="w"):
        data = random_blocks(type, shape, np.random.default_rng(seed))
        return Weight(name, GGMLType(type), tuple(shape), data)
    return make
