"""GGML tensor types: the table of block layouts, plus the numpy reference (de)quantisers.

The reference functions are the oracle every optimised kernel is tested against: they favour
clarity over speed, but are vectorised over blocks.
"""
import enum
from dataclasses import dataclass

import numpy as np


class GGMLType(enum.IntEnum):
    """Tensor type ids as stored in GGUF files."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


@dataclass(frozen=True)
class TypeInfo:
    """How one GGML type packs values: `block_size` values take `type_size` bytes.

    `activation_type` (ggml's vec_dot_type): what a matmul rounds the activations to before they
    meet weights of this type: Q8_0 blocks for the legacy quants, Q8_K for the k-quants, nothing
    (F32) for float weights. Every backend follows it (zephyr.backend's numeric contract)."""

    type: GGMLType
    block_size: int
    type_size: int
    activation_type: GGMLType = GGMLType.F32

    def row_bytes(self, n: int) -> int:
        """Bytes taken by a row of `n` values (n must be a multiple of block_size)."""
        return n // self.block_size * self.type_size


QK = 32      # values per block of the legacy formats
QK_K = 256   # values per super-block of the k-quants

# Layout facts for every type a GGUF file may hold (so the reader can size any tensor),
# whether or not zephyr can compute with it.
TYPE_INFO = {t.type: t for t in [
    TypeInfo(GGMLType.F32, 1, 4),
    TypeInfo(GGMLType.F16, 1, 2),
    TypeInfo(GGMLType.BF16, 1, 2),
    TypeInfo(GGMLType.F64, 1, 8),
    TypeInfo(GGMLType.I8, 1, 1),
    TypeInfo(GGMLType.I16, 1, 2),
    TypeInfo(GGMLType.I32, 1, 4),
    TypeInfo(GGMLType.I64, 1, 8),
    TypeInfo(GGMLType.Q4_0, QK, 2 + QK // 2, GGMLType.Q8_0),
    TypeInfo(GGMLType.Q4_1, QK, 4 + QK // 2, GGMLType.Q8_0),
    TypeInfo(GGMLType.Q5_0, QK, 2 + 4 + QK // 2, GGMLType.Q8_0),
    TypeInfo(GGMLType.Q5_1, QK, 4 + 4 + QK // 2, GGMLType.Q8_0),
    TypeInfo(GGMLType.Q8_0, QK, 2 + QK, GGMLType.Q8_0),
    TypeInfo(GGMLType.Q8_1, QK, 4 + QK),
    TypeInfo(GGMLType.Q2_K, QK_K, QK_K // 16 + QK_K // 4 + 4, GGMLType.Q8_K),
    TypeInfo(GGMLType.Q3_K, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2, GGMLType.Q8_K),
    TypeInfo(GGMLType.Q4_K, QK_K, 4 + 12 + QK_K // 2, GGMLType.Q8_K),
    TypeInfo(GGMLType.Q5_K, QK_K, 4 + 12 + QK_K // 8 + QK_K // 2, GGMLType.Q8_K),
    TypeInfo(GGMLType.Q6_K, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, GGMLType.Q8_K),
    TypeInfo(GGMLType.Q8_K, QK_K, 4 + QK_K + QK_K // 16 * 2),
    TypeInfo(GGMLType.IQ2_XXS, QK_K, 2 + QK_K // 4),
    TypeInfo(GGMLType.IQ2_XS, QK_K, 2 + QK_K // 4 + QK_K // 32),
    TypeInfo(GGMLType.IQ3_XXS, QK_K, 2 + QK_K // 4 + QK_K // 8),
    TypeInfo(GGMLType.IQ1_S, QK_K, 2 + QK_K // 8 + QK_K // 16),
    TypeInfo(GGMLType.IQ4_NL, QK, 2 + QK // 2),
    TypeInfo(GGMLType.IQ3_S, QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    TypeInfo(GGMLType.IQ2_S, QK_K, 2 + QK_K // 4 + QK_K // 16),
    TypeInfo(GGMLType.IQ4_XS, QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    TypeInfo(GGMLType.IQ1_M, QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    TypeInfo(GGMLType.TQ1_0, QK_K, 2 + 4 * 13),
    TypeInfo(GGMLType.TQ2_0, QK_K, 2 + 64),
    TypeInfo(GGMLType.MXFP4, QK, 1 + QK // 2),
]}

# Weight types zephyr computes with (reference dequantiser present).
SUPPORTED_TYPES = frozenset({
    GGMLType.F32, GGMLType.F16, GGMLType.BF16,
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
})

# Every dequantiser below works on `blocks`: uint8 [n_blocks, type_size], one block per row, and
# returns float32 [n_blocks, block_size]. Arithmetic is float32 in ggml's order of operations, so
# results match ggml's reference dequantisers exactly. Multi-byte fields are little-endian.

_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8)
_CRUMB_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)   # the four 2-bit fields of a byte
_BIT_SHIFTS = np.arange(8, dtype=np.uint8)


def _f16(blocks, start):
    """The f16 at byte `start` of every block, as float32 [n_blocks, 1]."""
    return blocks[:, start:start + 2].view(np.float16).astype(np.float32)


def _nibbles(qs):
    """uint8 [..., m] -> [..., 2, m]: all low nibbles, then all high nibbles."""
    return (qs[..., None, :] >> _NIBBLE_SHIFTS[:, None]) & 0xF


def _crumbs(qs):
    """uint8 [..., m] -> [..., 4, m]: bits 0-1 of every byte, then bits 2-3, 4-5, 6-7."""
    return (qs[..., None, :] >> _CRUMB_SHIFTS[:, None]) & 3


def _bits(qh):
    """uint8 [..., m] -> [..., 8, m]: bit 0 of every byte, then bit 1, ... bit 7."""
    return (qh[..., None, :] >> _BIT_SHIFTS[:, None]) & 1


def _dequantize_f32(blocks):
    """F32: 4-byte IEEE single per value."""
    return blocks.view(np.float32)


def _dequantize_f16(blocks):
    """F16: 2-byte IEEE half per value."""
    return blocks.view(np.float16).astype(np.float32)


def _dequantize_bf16(blocks):
    """BF16: 2 bytes per value, the upper half of an IEEE single (value = bits << 16 as f32)."""
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dequantize_q4_0(blocks):
    """Q4_0, 32 values in 18 bytes: f16 d | u8 qs[16].

    q[j] = qs[j] & 0xF and q[j+16] = qs[j] >> 4 (j < 16); value = (q - 8) * d.
    """
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:18]).reshape(-1, QK)
    return (q.astype(np.float32) - 8) * d


def _dequantize_q4_1(blocks):
    """Q4_1, 32 values in 20 bytes: f16 d | f16 m | u8 qs[16].

    Nibbles as Q4_0; value = q * d + m.
    """
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:20]).reshape(-1, QK)
    return q.astype(np.float32) * d + m


def _fifth_bits(qh):
    """Q5_0/Q5_1 qh (u8[4], one little-endian u32) -> [n_blocks, 32]: bit j belongs to value j."""
    return _bits(qh).transpose(0, 2, 1).reshape(-1, QK)


def _dequantize_q5_0(blocks):
    """Q5_0, 32 values in 22 bytes: f16 d | u8 qh[4] | u8 qs[16].

    q = nibble (as Q4_0) | (bit j of the u32 qh) << 4 for value j; value = (q - 16) * d.
    """
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 6:22]).reshape(-1, QK) | (_fifth_bits(blocks[:, 2:6]) << 4)
    return (q.astype(np.float32) - 16) * d


def _dequantize_q5_1(blocks):
    """Q5_1, 32 values in 24 bytes: f16 d | f16 m | u8 qh[4] | u8 qs[16].

    q as Q5_0; value = q * d + m.
    """
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:24]).reshape(-1, QK) | (_fifth_bits(blocks[:, 4:8]) << 4)
    return q.astype(np.float32) * d + m


def _dequantize_q8_0(blocks):
    """Q8_0, 32 values in 34 bytes: f16 d | i8 qs[32]. value = q * d."""
    d = _f16(blocks, 0)
    return blocks[:, 2:34].view(np.int8).astype(np.float32) * d


def _dequantize_q8_k(blocks):
    """Q8_K, 256 values in 292 bytes: f32 d | i8 qs[256] | i16 bsums[16]. value = q * d.

    bsums[i] = sum of qs[16i:16i+16]; dot-product kernels use it, dequantisation does not.
    """
    d = blocks[:, 0:4].view(np.float32)
    return blocks[:, 4:260].view(np.int8).astype(np.float32) * d


def _dequantize_q2_k(blocks):
    """Q2_K, 256 values in 84 bytes: u8 scales[16] | u8 qs[64] | f16 d | f16 dmin.

    16 sub-blocks of 16 values; scales[i] & 0xF is sub-block i's scale, scales[i] >> 4 its min.
    Value v (0..255): half h = v // 128, shift s = 2 * ((v % 128) // 32), l = v % 32;
    q = (qs[32h + l] >> s) & 3; value = d * scale * q - dmin * min.
    """
    scales = blocks[:, 0:16]
    q = _crumbs(blocks[:, 16:80].reshape(-1, 2, 32)).reshape(-1, 16, 16)   # [n, sub-block, 16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = d * (scales & 0xF).astype(np.float32)
    ml = dmin * (scales >> 4).astype(np.float32)
    return (dl[:, :, None] * q.astype(np.float32) - ml[:, :, None]).reshape(-1, QK_K)


def _q3_k_scales(packed):
    """Q3_K's 12 scale bytes -> int [n_blocks, 16] signed 6-bit scales (-32..31).

    Scale i: low 4 bits from scales[i % 8] (low nibble for i < 8, high nibble for i >= 8),
    high 2 bits from scales[8 + i % 4] at bit 2 * (i // 4); minus 32.
    """
    low = _nibbles(packed[:, 0:8]).reshape(-1, 16)
    high = _crumbs(packed[:, 8:12]).reshape(-1, 16)
    return (low | (high << 4)).astype(np.int32) - 32


def _dequantize_q3_k(blocks):
    """Q3_K, 256 values in 110 bytes: u8 hmask[32] | u8 qs[64] | u8 scales[12] | f16 d.

    16 sub-blocks of 16 values with signed 6-bit scales (see _q3_k_scales).
    Value v: group g = v // 32 (h = g // 4, shift s = 2 * (g % 4)), l = v % 32;
    q = ((qs[32h + l] >> s) & 3) - (0 if bit g of hmask[l] is set else 4); value = d * scale * q.
    """
    low = _crumbs(blocks[:, 32:96].reshape(-1, 2, 32)).reshape(-1, 8, 32)
    high = _bits(blocks[:, 0:32])                                            # [n, group, 32]
    q = low.astype(np.int8) - 4 * (1 - high.astype(np.int8))
    dl = _f16(blocks, 108) * _q3_k_scales(blocks[:, 96:108]).astype(np.float32)
    return (dl[:, :, None] * q.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, QK_K)


def _k_scale_min(packed):
    """Q4_K/Q5_K's 12 scale bytes -> (scale, min), each uint8 [n_blocks, 8] of 6-bit values.

    With a = bytes 0-3, b = bytes 4-7, c = bytes 8-11 (j < 4):
      scale[j] = a[j] & 63,                       min[j] = b[j] & 63,
      scale[j+4] = (c[j] & 0xF) | (a[j] >> 6) << 4, min[j+4] = (c[j] >> 4) | (b[j] >> 6) << 4.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = np.concatenate([a & 63, (c & 0xF) | ((a >> 6) << 4)], axis=1)
    minimum = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scale, minimum


def _pack_k_scale_min(scale, minimum):
    """Inverse of _k_scale_min: 6-bit (scale, min) [n_blocks, 8] each -> uint8 [n_blocks, 12]."""
    scale, minimum = scale.astype(np.uint8), minimum.astype(np.uint8)
    a = (scale[:, :4] & 63) | ((scale[:, 4:] >> 4) << 6)
    b = (minimum[:, :4] & 63) | ((minimum[:, 4:] >> 4) << 6)
    c = (scale[:, 4:] & 0xF) | ((minimum[:, 4:] & 0xF) << 4)
    return np.concatenate([a, b, c], axis=1)


def _dequantize_q4_k(blocks):
    """Q4_K, 256 values in 144 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qs[128].

    8 sub-blocks of 32 values with 6-bit (scale, min) pairs (see _k_scale_min).
    Chunk c (64 values) reads qs[32c:32c+32]: low nibbles are sub-block 2c, high nibbles 2c+1;
    value = d * scale * q - dmin * min.
    """
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)   # [n, sub-block, 32]
    dl, ml = d * scale.astype(np.float32), dmin * minimum.astype(np.float32)
    return (dl[:, :, None] * q.astype(np.float32) - ml[:, :, None]).reshape(-1, QK_K)


def _dequantize_q5_k(blocks):
    """Q5_K, 256 values in 176 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128].

    As Q4_K plus a fifth bit: value l (0..31) of sub-block i takes bit i of qh[l];
    value = d * scale * (q + 16 * bit) - dmin * min.
    """
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    q = _nibbles(blocks[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q = q | (_bits(blocks[:, 16:48]) << 4)
    dl, ml = d * scale.astype(np.float32), dmin * minimum.astype(np.float32)
    return (dl[:, :, None] * q.astype(np.float32) - ml[:, :, None]).reshape(-1, QK_K)


def _dequantize_q6_k(blocks):
    """Q6_K, 256 values in 210 bytes: u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d.

    Half h (128 values) reads ql[64h:64h+64] and qh[32h:32h+32]. Its value 32k + l (k < 4, l < 32)
    takes 4 low bits from ql[l + 32 * (k % 2)] (low nibble if k < 2, else high) and 2 high bits
    from (qh[l] >> 2k) & 3; q = that - 32. Sub-block of 16 values i uses scales[i];
    value = d * scale * q.
    """
    ql = _nibbles(blocks[:, 0:128].reshape(-1, 2, 64)).reshape(-1, 2, 4, 32)        # [n, half, k, 32]
    qh = _crumbs(blocks[:, 128:192].reshape(-1, 2, 32))                     # [n, half, k, 32]
    q = (ql | (qh << 4)).astype(np.int8) - 32
    dl = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)
    return (dl[:, :, None] * q.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, QK_K)


_DEQUANTIZERS = {
    GGMLType.F32: _dequantize_f32,
    GGMLType.F16: _dequantize_f16,
    GGMLType.BF16: _dequantize_bf16,
    GGMLType.Q4_0: _dequantize_q4_0,
    GGMLType.Q4_1: _dequantize_q4_1,
    GGMLType.Q5_0: _dequantize_q5_0,
    GGMLType.Q5_1: _dequantize_q5_1,
    GGMLType.Q8_0: _dequantize_q8_0,
    GGMLType.Q8_K: _dequantize_q8_k,
    GGMLType.Q2_K: _dequantize_q2_k,
    GGMLType.Q3_K: _dequantize_q3_k,
    GGMLType.Q4_K: _dequantize_q4_k,
    GGMLType.Q5_K: _dequantize_q5_k,
    GGMLType.Q6_K: _dequantize_q6_k,
}


def _type_name(type) -> str:
    try:
        return GGMLType(type).name
    except ValueError:
        return f"unknown type id {int(type)}"


def _check_shape(type, shape) -> TypeInfo:
    """The TypeInfo of `type` after checking the last dim of `shape` is whole blocks."""
    info = TYPE_INFO[GGMLType(type)]
    if not shape or shape[-1] % info.block_size:
        raise ValueError(f"{info.type.name} tensor of shape {list(shape)}: the last dimension must be "
                         f"a multiple of the block size {info.block_size}")
    return info


def dequantize(data, type, shape) -> np.ndarray:
    """Decode raw GGUF tensor bytes to float32 of `shape` (row-major).

    `data` (uint8, any shape, e.g. a read-only view on a memory map) is only read. The result is
    new memory, except for F32, where it is a view of `data`.
    """
    shape = tuple(int(s) for s in shape)
    decode = _DEQUANTIZERS.get(type)
    if decode is None:
        raise ValueError(f"cannot dequantize {_type_name(type)} (shape {list(shape)}): supported types are "
                         f"{', '.join(t.name for t in _DEQUANTIZERS)}")
    info = _check_shape(type, shape)
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"{info.type.name} tensor of shape {list(shape)}: expected raw uint8 bytes, got {data.dtype}")
    expected = info.row_bytes(int(np.prod(shape, dtype=np.int64)))
    if data.size != expected:
        raise ValueError(f"{info.type.name} tensor of shape {list(shape)} needs {expected} bytes, got {data.size}")
    return decode(data.reshape(-1, info.type_size)).reshape(shape)


def _round_half_away(x):
    """C's roundf on float32 values (np.round would round halves to even)."""
    x = x.astype(np.float64)   # exact for float32 inputs, so adding 0.5 cannot round up early
    return np.copysign(np.floor(np.abs(x) + 0.5), x)


def quantize_q8_0(x) -> np.ndarray:
    """float32 [..., k] (k % 32 == 0) -> Q8_0 bytes uint8 [..., k // 32 * 34], as ggml's reference.

    Per 32 values: d = max|x| / 127, q = roundf(x / d) (0 where d == 0). q is rounded with the
    float32 d, then d is stored as f16, so |x - q * d_f16| <= d / 2 + 127 * |d - d_f16|.
    """
    x = np.asarray(x, dtype=np.float32)
    if not x.ndim or x.shape[-1] % QK:
        raise ValueError(f"quantize_q8_0: the last dimension of shape {list(x.shape)} must be a multiple of {QK}")
    blocks = x.reshape(-1, QK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_half_away(blocks * inverse).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def quantize_q8_k(x) -> np.ndarray:
    """float32 [..., k] (k % 256 == 0) -> Q8_K bytes uint8 [..., k // 256 * 292], as ggml's reference.

    Per 256 values: `max` is the first value of largest magnitude (sign kept); iscale = -127 / max,
    q = min(127, round_half_even(iscale * x)), d = 1 / iscale (so d < 0 when max > 0), and
    bsums[i] = sum(q[16i:16i+16]). An all-zero block gives d = 0, q = 0, bsums = 0.
    """
    x = np.asarray(x, dtype=np.float32)
    if not x.ndim or x.shape[-1] % QK_K:
        raise ValueError(f"quantize_q8_k: the last dimension of shape {list(x.shape)} must be a multiple of {QK_K}")
    blocks = x.reshape(-1, QK_K)
    first_largest = np.abs(blocks).argmax(axis=1)[:, None]
    peak = np.take_along_axis(blocks, first_largest, axis=1)
    with np.errstate(divide="ignore"):
        iscale = np.where(peak == 0, np.float32(0), np.float32(-127) / peak)
        d = np.where(peak == 0, np.float32(0), np.float32(1) / iscale)
    q = np.minimum(np.rint(iscale * blocks), 127).astype(np.int8)
    bsums = q.reshape(-1, 16, 16).sum(axis=2, dtype=np.int16)
    out = np.concatenate([d.astype(np.float32).view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def round_activations(x, weight_type) -> np.ndarray:
    """x: float32 [n, k] as a matmul with weights of `weight_type` sees it: rounded through the
    type's activation_type (Q8_0 or Q8_K blocks) and decoded back; x itself for float weights."""
    kind = TYPE_INFO[weight_type].activation_type
    if kind == GGMLType.Q8_0:
        return dequantize(quantize_q8_0(x), kind, x.shape)
    if kind == GGMLType.Q8_K:
        return dequantize(quantize_q8_k(x), kind, x.shape)
    return x
