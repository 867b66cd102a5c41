"""Sizing memory before allocating it, so a request that cannot fit fails with advice, not an OOM kill."""
import os

from .errors import ZephyrError


class InsufficientMemoryError(ZephyrError, MemoryError):
    """An allocation zephyr was asked to make does not fit in the memory available."""


def available_memory() -> int:
    """Bytes of memory the system can still give this process (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62   # unknown: do not refuse


def require(nbytes: int, what: str, advice: str):
    """Raise InsufficientMemoryError unless `nbytes` fit in the available memory."""
    available = available_memory()
    if nbytes > available:
        raise InsufficientMemoryError(
            f"{what} needs {_gib(nbytes)} but only {_gib(available)} of memory is available; {advice}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
