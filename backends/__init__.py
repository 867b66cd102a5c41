"""zephyr's built-in backends, installed as the package `zephyr_backends`."""
