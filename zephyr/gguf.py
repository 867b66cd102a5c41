"""Reading GGUF files: metadata, the tensor table, and zero-copy views of tensor data.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the
metadata key/value pairs, the tensor infos, padding to `general.alignment`, then the data section.
A tensor info's dims are stored innermost first; `TensorInfo.shape` is row-major (reversed).

Everything read from the file is untrusted: every count, length, type and offset is checked against
the file's size before it is used, so a malformed file raises GGUFError, never crashes or allocates
what the file merely claims to hold.
"""
import enum
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GGUFError
from .quants import TYPE_INFO, GGMLType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 8
# Metadata values (array items included) in one file. Each becomes a Python object of up to ten
# times its size on disk; the largest real vocabularies (tokens, scores, types, merges) hold about
# a million, so a file claiming more is refused rather than decoded into gigabytes.
MAX_METADATA_VALUES = 1 << 23
# Metadata keys and tensors: real files have tens of keys and at most a few thousand tensors. Each
# costs microseconds to parse, so these bound the time a hostile header can take to a second or so.
MAX_METADATA_KEYS = 1 << 16
MAX_TENSORS = 1 << 16


class GGUFValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types: numpy dtype (little-endian).
SCALAR_DTYPES = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `offset` is absolute (from the start of the file)."""

    name: str
    shape: tuple      # row-major, e.g. (rows, cols)
    type: GGMLType
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class GGUFFile:
    """An open GGUF file. Tensor data stays in the memory map until a view of it is asked for."""

    def __init__(self, path, version, metadata, tensors, alignment, data_offset, mapping, file):
        self.path = Path(path)
        self.version = version
        self.metadata = metadata          # key -> Python value (int, float, bool, str, list)
        self.tensors = tensors            # list[TensorInfo], in file order
        self.alignment = alignment
        self.data_offset = data_offset    # where the data section starts
        self._by_name = {t.name: t for t in tensors}
        self._mapping = mapping
        self._file = file
        self._buffer = np.frombuffer(mapping, dtype=np.uint8) if mapping is not None else np.zeros(0, np.uint8)

    # -- lookups ---------------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        return name in self._by_name

    def tensor(self, name) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def tensor_data(self, tensor) -> np.ndarray:
        """The raw bytes of a tensor (a TensorInfo or a name): a read-only uint8 view, no copy."""
        info = tensor if isinstance(tensor, TensorInfo) else self.tensor(tensor)
        if self._mapping is None:
            raise GGUFError("the file is closed", self.path)
        return self._buffer[info.offset:info.offset + info.nbytes]

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    # -- lifetime --------------------------------------------------------------------------
    def close(self):
        """Release the memory map. Views handed out earlier keep it alive until they are dropped."""
        self._buffer = np.zeros(0, np.uint8)
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # numpy views still point into it; it is freed with them
                pass
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- display ---------------------------------------------------------------------------
    def summary(self, max_list=8) -> str:
        """A readable overview: metadata (long lists abbreviated), tensor types and sizes."""
        lines = [f"{self.path.name}: GGUF v{self.version}, {len(self.metadata)} metadata keys, "
                 f"{len(self.tensors)} tensors, {_human_bytes(sum(t.nbytes for t in self.tensors))} of tensor data"]
        for key, value in self.metadata.items():
            lines.append(f"  {key} = {_short_repr(value, max_list)}")
        counts = {}
        for t in self.tensors:
            n, size = counts.get(t.type.name, (0, 0))
            counts[t.type.name] = (n + 1, size + t.nbytes)
        lines.append("  tensor types: " + ", ".join(
            f"{name} x{n} ({_human_bytes(size)})" for name, (n, size) in sorted(counts.items())))
        return "\n".join(lines)

    def __repr__(self):
        return f"<GGUFFile {str(self.path)!r} v{self.version} {len(self.tensors)} tensors>"


def read(path) -> GGUFFile:
    """Open a GGUF file: parse metadata and the tensor table, map (but do not read) tensor data."""
    path = Path(path)
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise GGUFError(f"cannot open: {exc.strerror}", path) from None
    try:
        size = path.stat().st_size
        if size == 0:
            raise GGUFError("the file is empty, not a GGUF model", path, 0)
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        parsed = _Parser(mapping, path).parse()
        return GGUFFile(path, *parsed, mapping=mapping, file=file)
    except BaseException:
        file.close()
        raise


class _Parser:
    """Walks the header with a cursor; every read is bounds-checked first."""

    def __init__(self, buffer, path):
        self.buf = buffer
        self.size = len(buffer)
        self.path = path
        self.pos = 0
        self.values = 0     # metadata values decoded so far, array items included

    def fail(self, message, offset=None):
        raise GGUFError(message, self.path, self.pos if offset is None else offset)

    def need(self, nbytes, what):
        if nbytes > self.size - self.pos:
            self.fail(f"truncated {what}: needs {nbytes} bytes, only {self.size - self.pos} left in the file")

    def unpack(self, fmt, what):
        nbytes = struct.calcsize(fmt)
        self.need(nbytes, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += nbytes
        return values[0] if len(values) == 1 else values

    def string(self, what):
        start = self.pos
        length = self.unpack("<Q", f"{what} length")
        if length > self.size - self.pos:
            self.fail(f"{what} claims {length} bytes but only {self.size - self.pos} are left in the file", start)
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"{what} is not valid UTF-8 ({exc.reason})", start)

    def parse(self):
        self.need(4, "header (magic)")
        magic = bytes(self.buf[0:4])
        if magic != GGUF_MAGIC:
            self.fail(f"bad magic {magic!r}: this is not a GGUF file (expected {GGUF_MAGIC!r})", 0)
        self.pos = 4
        version = self.unpack("<I", "header (version)")
        if version not in SUPPORTED_VERSIONS:
            hint = " (GGUF v1 files are too old: convert them again with current llama.cpp tools)" if version == 1 else ""
            self.fail(f"unsupported GGUF version {version}; zephyr reads versions "
                      f"{', '.join(map(str, SUPPORTED_VERSIONS))}{hint}", 4)
        n_tensors = self.unpack("<Q", "header (tensor count)")
        n_kv = self.unpack("<Q", "header (metadata count)")
        # Smallest possible entries: a kv is key length + type + a one-byte value, a tensor info is
        # name length + n_dims + type + offset. Counts beyond what the file could hold are lies.
        self.check_count(n_kv, 8 + 4 + 1, "metadata count", 16)
        self.check_count(n_tensors, 8 + 4 + 4 + 8, "tensor count", 8)
        if n_kv > MAX_METADATA_KEYS or n_tensors > MAX_TENSORS:
            self.fail(f"{n_kv} metadata keys and {n_tensors} tensors: zephyr reads files of up to "
                      f"{MAX_METADATA_KEYS:,} keys and {MAX_TENSORS:,} tensors", 8)

        metadata = {}
        for _ in range(n_kv):
            key_offset = self.pos
            key = self.string("metadata key")
            if key in metadata:
                self.fail(f"duplicate metadata key {key!r}", key_offset)
            value_type = self.value_type(f"metadata {key!r}")
            metadata[key] = self.value(value_type, f"metadata {key!r}", 0)

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            self.fail(f"general.alignment must be a positive power of two, got {alignment!r}")

        infos = [self.tensor_info() for _ in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        tensors = self.place_tensors(infos, data_offset, alignment)
        return version, metadata, tensors, alignment, data_offset

    def check_count(self, count, min_entry_bytes, what, offset):
        if count > (self.size - self.pos) // min_entry_bytes:
            self.fail(f"{what} {count} is larger than the file could hold ({self.size} bytes)", offset)

    def value_type(self, what):
        offset = self.pos
        raw = self.unpack("<I", f"{what} type")
        try:
            return GGUFValueType(raw)
        except ValueError:
            self.fail(f"{what} has unknown value type {raw}", offset)

    def count_values(self, n, what, offset=None):
        self.values += n
        if self.values > MAX_METADATA_VALUES:
            self.fail(f"{what}: the metadata holds more than {MAX_METADATA_VALUES:,} values, far more than any "
                      f"model needs", offset)

    def value(self, value_type, what, depth):
        self.count_values(1, what)
        if value_type == GGUFValueType.STRING:
            return self.string(what)
        if value_type == GGUFValueType.ARRAY:
            return self.array(what, depth)
        dtype = SCALAR_DTYPES[value_type]
        self.need(dtype.itemsize, what)
        value = np.frombuffer(self.buf, dtype, 1, self.pos)[0].item()
        self.pos += dtype.itemsize
        return bool(value) if value_type == GGUFValueType.BOOL else value

    def array(self, what, depth):
        if depth >= MAX_ARRAY_NESTING:
            self.fail(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        item_type = self.value_type(f"{what} array item")
        count_offset = self.pos
        count = self.unpack("<Q", f"{what} array length")
        if item_type in SCALAR_DTYPES:
            dtype = SCALAR_DTYPES[item_type]
            if count > (self.size - self.pos) // dtype.itemsize:
                self.fail(f"{what}: array of {count} {item_type.name} values is larger than the rest of the file",
                          count_offset)
            self.count_values(count, what, count_offset)
            values = np.frombuffer(self.buf, dtype, count, self.pos)
            self.pos += count * dtype.itemsize
            return [bool(v) for v in values] if item_type == GGUFValueType.BOOL else values.tolist()
        # strings and arrays take at least 8 bytes each (their length)
        self.check_count(count, 8 if item_type == GGUFValueType.STRING else 12, f"{what} array length", count_offset)
        self.count_values(count, what, count_offset)   # nested items count again as they are read
        if item_type == GGUFValueType.STRING:
            return self.string_array(count, what)
        return [self.value(item_type, what, depth + 1) for _ in range(count)]

    def string_array(self, count, what):
        # The vocabulary is the largest thing in the header (tens of thousands of strings): keep this lean.
        buf, size, pos = self.buf, self.size, self.pos
        unpack_length = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if size - pos < 8:
                self.pos = pos
                self.fail(f"truncated {what}: a string length runs past the end of the file")
            (length,) = unpack_length(buf, pos)
            pos += 8
            if length > size - pos:
                self.pos = pos - 8
                self.fail(f"{what}: a string claims {length} bytes but only {size - pos} are left in the file")
            try:
                append(buf[pos:pos + length].decode("utf-8"))
            except UnicodeDecodeError as exc:
                self.pos = pos
                self.fail(f"{what}: a string is not valid UTF-8 ({exc.reason})")
            pos += length
        self.pos = pos
        return out

    def tensor_info(self):
        start = self.pos
        name = self.string("tensor name")
        n_dims = self.unpack("<I", f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            self.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}", start)
        self.need(8 * n_dims, f"tensor {name!r} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
        self.pos += 8 * n_dims
        type_offset = self.pos
        raw_type = self.unpack("<I", f"tensor {name!r} type")
        offset = self.unpack("<Q", f"tensor {name!r} offset")
        try:
            ggml_type = GGMLType(raw_type)
        except ValueError:
            self.fail(f"tensor {name!r} has unknown ggml type {raw_type}", type_offset)
        info = TYPE_INFO[ggml_type]
        if any(d == 0 for d in dims) or any(d >= 1 << 62 for d in dims):
            self.fail(f"tensor {name!r} has invalid dimensions {list(dims)}", start)
        n_elements = 1
        for d in dims:
            n_elements *= d
        if n_elements >= 1 << 62:
            self.fail(f"tensor {name!r} is impossibly large ({n_elements} elements)", start)
        if dims[0] % info.block_size:
            self.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {ggml_type.name} "
                      f"block size {info.block_size}", start)
        nbytes = n_elements // info.block_size * info.type_size
        return name, tuple(reversed(dims)), ggml_type, offset, nbytes, start

    def place_tensors(self, infos, data_offset, alignment):
        tensors, seen = [], set()
        for name, shape, ggml_type, offset, nbytes, start in infos:
            if name in seen:
                self.fail(f"duplicate tensor name {name!r}", start)
            seen.add(name)
            if offset % alignment:
                self.fail(f"tensor {name!r} data offset {offset} is not aligned to {alignment} bytes", start)
            absolute = data_offset + offset
            if absolute + nbytes > self.size:
                self.fail(f"tensor {name!r} data ({nbytes} bytes at {absolute}) lies outside the file "
                          f"({self.size} bytes): the file is truncated or corrupt", start)
            tensors.append(TensorInfo(name, shape, ggml_type, absolute, nbytes))
        by_offset = sorted(tensors, key=lambda t: t.offset)
        for a, b in zip(by_offset, by_offset[1:]):
            if a.offset + a.nbytes > b.offset:
                self.fail(f"tensors {a.name!r} and {b.name!r} overlap in the data section", a.offset)
        return tensors


def _short_repr(value, max_list):
    if isinstance(value, list) and len(value) > max_list:
        head = ", ".join(_short_repr(v, max_list) for v in value[:3])
        return f"[{head}, ... ({len(value)} items)]"
    if isinstance(value, str) and len(value) > 120:
        return repr(value[:100] + "...") + f" ({len(value)} chars)"
    return repr(value)


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
