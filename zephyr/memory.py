"""Sizing memory before allocating it, so a request that cannot fit fails with advice, not an OOM kill."""
import mmap
import os

import numpy as np

from .errors import ZephyrError


class InsufficientMemoryError(ZephyrError, MemoryError):
    """An allocation zephyr was asked to make does not fit in the memory available."""


UNKNOWN = 1 << 62   # no limit could be read: do not refuse


def available_memory() -> int:
    """Bytes of memory this process can still get: the least of the system's MemAvailable, what its
    container (cgroup v2 or v1) still allows, and what its address-space limit (ulimit -v) leaves."""
    return min(_system_available(), _cgroup_available(), _address_space_left())


def _system_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return UNKNOWN


def _cgroup_available() -> int:
    """limit - usage of the container's memory cgroup, as mounted inside it."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            if limit == "max" or int(limit) >= UNKNOWN:
                return UNKNOWN
            with open(usage_file) as f:
                return max(0, int(limit) - int(f.read().strip()))
        except (OSError, ValueError):
            continue
    return UNKNOWN


def _address_space_left() -> int:
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return UNKNOWN
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return max(0, limit - used)
    except (ImportError, OSError, ValueError):
        return UNKNOWN


def require(nbytes: int, what: str, advice: str, available: int = None):
    """Raise InsufficientMemoryError unless `nbytes` fit in `available` bytes (default: the
    process's available memory)."""
    available = available_memory() if available is None else available
    if nbytes > available:
        raise InsufficientMemoryError(
            f"{what} needs {_gib(nbytes)} but only {_gib(available)} of memory is available; {advice}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def lazy_zeros(shape, dtype=np.uint8) -> np.ndarray:
    """A zeroed array whose memory is taken a small page at a time, where it is first written.
    np.zeros takes transparent huge pages for large arrays, so one write commits the 2 MB around it:
    a KV cache's first token of a sequence writes a row into every head's run of positions and
    would commit (and zero) that sequence's whole share of the cache in its first forward pass."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    try:
        area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:   # an address-space limit, or strict overcommit
        raise InsufficientMemoryError(f"could not reserve {_gib(nbytes)} of memory ({exc.strerror}); "
                                      f"ask for less (a smaller context_length or fewer sequences)") from None
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        area.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(area, dtype).reshape(shape)


def release_pages(array) -> bool:
    """Let the OS drop this process's mapping of the pages under `array`, a view of a file's memory
    map (madvise MADV_DONTNEED), for data that has been copied elsewhere: they leave the process's
    RSS, stay in the page cache, and are mapped again if touched. Only shared maps of files
    (mmap.ACCESS_READ, as zephyr.gguf opens them) are touched; for any other array this does
    nothing, since on anonymous or private memory it would discard data. Returns whether it acted."""
    owner = array
    while isinstance(owner, (np.ndarray, memoryview)):
        owner = owner.base if isinstance(owner, np.ndarray) else owner.obj
    if not isinstance(owner, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or owner.closed:
        return False
    whole = np.frombuffer(owner, np.uint8)
    if whole.flags.writeable:   # a writable or anonymous map: leave it alone
        return False
    page = mmap.PAGESIZE
    offset = array.ctypes.data - whole.ctypes.data
    start = -(-offset // page) * page                       # whole pages inside the array only
    end = (offset + array.nbytes) // page * page
    if end > start:
        owner.madvise(mmap.MADV_DONTNEED, start, end - start)
    return end > start
