"""Random but valid quant blocks of every supported type, for synthetic models and kernel tests.

Vectorised over blocks: a 7B-shaped file's tensors are generated in seconds.
"""
import numpy as np

from ..quants import SUPPORTED_TYPES, GGMLType, _check_shape, _pack_k_scale_min, _type_name


def _rms(values) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def random_blocks(type, shape, rng, scale=0.02) -> np.ndarray:
    """Raw bytes (uint8, 1-D) of a random tensor of `shape` whose values are finite, about zero-mean,
    with a root-mean-square of roughly `scale`. For synthetic models: vectorised, no per-block loop.

    Quant bits are uniformly random; scale fields are set so each block's RMS is `scale` times a
    per-block factor in [0.5, 1.5], and the mins of the offset formats cancel the quants' mean.
    """
    if type not in SUPPORTED_TYPES:
        raise ValueError(f"cannot make random {_type_name(type)} blocks (shape {list(shape)}): supported "
                         f"types are {', '.join(t.name for t in sorted(SUPPORTED_TYPES))}")
    shape = tuple(int(s) for s in shape)
    info = _check_shape(type, shape)
    n_blocks = int(np.prod(shape, dtype=np.int64)) // info.block_size
    if info.block_size == 1:
        values = rng.standard_normal(n_blocks, dtype=np.float32) * np.float32(scale)
        return _FLOAT_ENCODERS[type](values).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, info.type_size), dtype=np.uint8)
    factor = rng.uniform(0.5, 1.5, size=(n_blocks, 1)).astype(np.float32)
    _RANDOM_SCALES[type](blocks, rng, np.float32(scale) * factor)
    return blocks.reshape(-1)


def _to_bf16(values):
    """float32 -> BF16 bits (uint16), rounding to nearest even (finite inputs)."""
    bits = values.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


_FLOAT_ENCODERS = {
    GGMLType.F32: lambda v: v,
    GGMLType.F16: lambda v: v.astype(np.float16),
    GGMLType.BF16: _to_bf16,
}


def _set_f16(blocks, start, values):
    blocks[:, start:start + 2] = values.astype(np.float16).view(np.uint8)


def _f16_round(values):
    return values.astype(np.float16).astype(np.float32)


# Each writes the scale fields of random blocks in place, given `target`: float32 [n_blocks, 1],
# the RMS each block should have. Divisors are the RMS of the (centred) quant and sub-scale values.

def _random_q4_0(blocks, rng, target):
    _set_f16(blocks, 0, target / _rms(np.arange(16) - 8))


def _random_q4_1(blocks, rng, target):
    d = _f16_round(target / _rms(np.arange(16) - 7.5))
    _set_f16(blocks, 0, d)
    _set_f16(blocks, 2, -7.5 * d)


def _random_q5_0(blocks, rng, target):
    _set_f16(blocks, 0, target / _rms(np.arange(32) - 16))


def _random_q5_1(blocks, rng, target):
    d = _f16_round(target / _rms(np.arange(32) - 15.5))
    _set_f16(blocks, 0, d)
    _set_f16(blocks, 2, -15.5 * d)


def _random_q8_0(blocks, rng, target):
    _set_f16(blocks, 0, target / _rms(np.arange(-128, 128)))


def _random_q2_k(blocks, rng, target):
    scale = rng.integers(8, 16, size=(len(blocks), 16), dtype=np.uint8)
    blocks[:, 0:16] = scale | (scale << 4)                       # min = scale: dmin * min cancels the mean
    d = _f16_round(target / (_rms(np.arange(4) - 1.5) * _rms(np.arange(8, 16))))
    _set_f16(blocks, 80, d)
    _set_f16(blocks, 82, 1.5 * d)


def _random_q3_k(blocks, rng, target):
    # random hmask, quants and signed scales are already zero-mean
    _set_f16(blocks, 108, target / (_rms(np.arange(-4, 4)) * _rms(np.arange(-32, 32))))


def _random_k_offset(blocks, rng, target, n_levels):
    """Q4_K/Q5_K: random 6-bit scales, min = scale and dmin = d * mean(q) centre every sub-block."""
    scale = rng.integers(16, 64, size=(len(blocks), 8), dtype=np.uint8)
    blocks[:, 4:16] = _pack_k_scale_min(scale, scale)
    centre = (n_levels - 1) / 2
    d = _f16_round(target / (_rms(np.arange(n_levels) - centre) * _rms(np.arange(16, 64))))
    _set_f16(blocks, 0, d)
    _set_f16(blocks, 2, centre * d)


def _random_q4_k(blocks, rng, target):
    _random_k_offset(blocks, rng, target, 16)


def _random_q5_k(blocks, rng, target):
    _random_k_offset(blocks, rng, target, 32)


def _random_q6_k(blocks, rng, target):
    # random quants and signed int8 scales are already (nearly) zero-mean
    _set_f16(blocks, 208, target / (_rms(np.arange(-32, 32)) * _rms(np.arange(-128, 128))))


_RANDOM_SCALES = {
    GGMLType.Q4_0: _random_q4_0,
    GGMLType.Q4_1: _random_q4_1,
    GGMLType.Q5_0: _random_q5_0,
    GGMLType.Q5_1: _random_q5_1,
    GGMLType.Q8_0: _random_q8_0,
    GGMLType.Q2_K: _random_q2_k,
    GGMLType.Q3_K: _random_q3_k,
    GGMLType.Q4_K: _random_q4_k,
    GGMLType.Q5_K: _random_q5_k,
    GGMLType.Q6_K: _random_q6_k,
}
