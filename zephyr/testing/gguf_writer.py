"""Writing GGUF files (version 3): used to build synthetic models for tests and benchmarks.

Tensor data may be given lazily (a callable returning the bytes), so multi-gigabyte files are
written one tensor at a time without ever holding the whole model in memory.
"""
import struct
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np

from ..gguf import DEFAULT_ALIGNMENT, GGUF_MAGIC, SCALAR_DTYPES, GGUFValueType
from ..quants import TYPE_INFO, GGMLType


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF type (for arrays: the item type)."""

    type: GGUFValueType
    value: Any


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: `data` is its raw bytes, or a callable producing them on demand."""

    name: str
    type: GGMLType
    shape: tuple                                  # row-major
    data: Union[np.ndarray, bytes, Callable[[], Any]]

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        info = TYPE_INFO[self.type]
        return n // info.block_size * info.type_size


def write_gguf(path, metadata: dict, tensors, alignment=DEFAULT_ALIGNMENT):
    """Write a GGUF v3 file. Untyped metadata: bool, int (u32 / i32 / i64 / u64 by range), float (f32), str, lists."""
    tensors = list(tensors)
    with open(path, "wb") as f:
        f.write(encode_header(metadata, tensors, alignment))
        for t in tensors:
            data = t.data() if callable(t.data) else t.data
            raw = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
            if raw.nbytes != t.nbytes:
                raise ValueError(f"tensor {t.name!r}: {raw.nbytes} bytes given, {t.type.name}{list(t.shape)} needs {t.nbytes}")
            f.write(raw)
            f.write(b"\0" * (-t.nbytes % alignment))


def encode_header(metadata: dict, tensors, alignment=DEFAULT_ALIGNMENT) -> bytes:
    """Everything before the data section (padded to `alignment`); tensors laid out in order."""
    header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        value_type, item_type, value = _classify(value)
        header += _string(key) + struct.pack("<I", value_type) + _value(value_type, item_type, value)
    offset = 0
    for t in tensors:
        header += _string(t.name) + struct.pack("<I", len(t.shape))
        header += struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))
        header += struct.pack("<IQ", int(t.type), offset)
        offset += -(-t.nbytes // alignment) * alignment
    return bytes(header + b"\0" * (-len(header) % alignment))


def _classify(value):
    """(value type, array item type or None, plain value)."""
    if isinstance(value, Typed):
        if isinstance(value.value, (list, tuple, np.ndarray)):
            return GGUFValueType.ARRAY, value.type, value.value
        return value.type, None, value.value
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        item_type = _scalar_type(items[0]) if items else GGUFValueType.INT32
        if item_type == GGUFValueType.UINT32 and any(v < 0 for v in items):
            item_type = GGUFValueType.INT32
        return GGUFValueType.ARRAY, item_type, items
    return _scalar_type(value), None, value


def _scalar_type(value):
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        if 0 <= value < 1 << 32:
            return GGUFValueType.UINT32
        if -(1 << 31) <= value < 0:
            return GGUFValueType.INT32
        return GGUFValueType.INT64 if value < 0 or value < 1 << 63 else GGUFValueType.UINT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _value(value_type, item_type, value) -> bytes:
    if value_type == GGUFValueType.STRING:
        return _string(value)
    if value_type == GGUFValueType.ARRAY:
        out = struct.pack("<IQ", item_type, len(value))
        if item_type in SCALAR_DTYPES:
            return out + np.asarray(value, dtype=SCALAR_DTYPES[item_type]).tobytes()
        if item_type == GGUFValueType.STRING:
            return out + b"".join(_string(v) for v in value)
        return out + b"".join(_value(*_classify(v)) for v in value)  # arrays of arrays
    return np.asarray(value, dtype=SCALAR_DTYPES[value_type]).tobytes()


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw
