"""zephyr: run GGUF language models from Python."""
from .errors import GGUFError, ZephyrError

__version__ = "0.1.0"
