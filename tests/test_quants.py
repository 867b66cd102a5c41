"""The numpy reference (de)quantisers, checked against gguf-py's (the independent oracle)."""
import gguf
import numpy as np
import pytest

from zephyr import gguf as zgguf
from zephyr.quants import (QK, QK_K, SUPPORTED_TYPES, TYPE_INFO, GGMLType, _DEQUANTIZERS, _k_scale_min,
                           _pack_k_scale_min, dequantize, quantize_q8_0, quantize_q8_k)
from zephyr.testing.blocks import random_blocks

QUANT_TYPES = sorted(t for t in SUPPORTED_TYPES if TYPE_INFO[t].block_size > 1)
FLOAT_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16]
GGUF_QUANTIZABLE = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.BF16]

# Byte offsets of every f16 field in a block: random bytes there could decode to inf/NaN.
F16_FIELDS = {
    GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2],
    GGMLType.Q8_0: [0], GGMLType.Q2_K: [80, 82], GGMLType.Q3_K: [108], GGMLType.Q4_K: [0, 2],
    GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208],
}


def oracle(raw, type):
    """gguf-py's dequantisation of raw bytes [rows, row_bytes]."""
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(type)))


def random_raw(type, rows, blocks_per_row, rng):
    """Uniformly random block bytes [rows, row_bytes], with finite f16 fields."""
    info = TYPE_INFO[type]
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, info.type_size), dtype=np.uint8)
    for start in F16_FIELDS.get(type, []):
        raw[:, start:start + 2] = rng.standard_normal((len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def test_dispatch_covers_supported_types_and_q8_k():
    assert set(_DEQUANTIZERS) == SUPPORTED_TYPES | {GGMLType.Q8_K}


@pytest.mark.parametrize("type", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows, blocks_per_row", [(1, 1), (3, 2), (5, 7)])
def test_dequantize_random_bytes_matches_gguf(type, rows, blocks_per_row):
    rng = np.random.default_rng((int(type), rows, blocks_per_row))
    raw = random_raw(type, rows, blocks_per_row, rng)
    shape = (rows, blocks_per_row * TYPE_INFO[type].block_size)
    ours = dequantize(raw.reshape(-1), type, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_array_equal(ours, oracle(raw, type))


@pytest.mark.parametrize("type", GGUF_QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_gguf_quantized_tensor(type):
    x = np.random.default_rng(int(type)).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType(int(type)))
    ours = dequantize(raw, type, x.shape)
    np.testing.assert_array_equal(ours, oracle(raw, type))
    assert np.abs(ours - x).max() < 0.35          # 4-bit formats: half a step of max|x| / 8


def test_dequantize_3d_shape_and_read_only_input():
    raw = random_raw(GGMLType.Q4_K, 6, 1, np.random.default_rng(0)).reshape(-1)
    raw.flags.writeable = False
    ours = dequantize(raw, GGMLType.Q4_K, (2, 3, QK_K))
    np.testing.assert_array_equal(ours.reshape(6, QK_K), oracle(raw.reshape(6, -1), GGMLType.Q4_K))


def test_dequantize_f32_is_a_view():
    raw = np.arange(8, dtype=np.float32).view(np.uint8)
    out = dequantize(raw, GGMLType.F32, (2, 4))
    assert np.shares_memory(out, raw)
    np.testing.assert_array_equal(out.reshape(-1), np.arange(8))


def test_dequantize_smollm2_tensors(smollm2_path):
    with zgguf.read(smollm2_path) as f:
        for name, rows in [("blk.0.attn_k.weight", None), ("blk.0.ffn_down.weight", None),
                           ("blk.0.attn_norm.weight", None), ("token_embd.weight", 64)]:
            info = f.tensor(name)
            shape = info.shape if rows is None else (rows, info.shape[-1])
            raw = f.tensor_data(info)[:TYPE_INFO[info.type].row_bytes(int(np.prod(shape)))]
            ours = dequantize(raw, info.type, shape)
            expected = oracle(raw.reshape(-1, TYPE_INFO[info.type].row_bytes(shape[-1])), info.type)
            np.testing.assert_array_equal(ours.reshape(expected.shape), expected, err_msg=name)
        assert {f.tensor(n).type for n in ["token_embd.weight", "blk.0.attn_k.weight"]} == {
            GGMLType.Q8_0, GGMLType.Q4_1}


# -- 8-bit activation formats -------------------------------------------------------------------

def q8_0_input():
    """Random blocks, an all-zero block, and one where max|x| = 127 makes every x.5 a rounding tie."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)
    x[0, 0, :QK] = 0
    x[0, 1, :QK] = np.concatenate([[127], np.arange(-15, 16) + 0.5]).astype(np.float32)
    return x


def test_quantize_q8_0_matches_gguf():
    x = q8_0_input()
    ours = quantize_q8_0(x)
    assert ours.dtype == np.uint8 and ours.shape == (3, 4, 2 * TYPE_INFO[GGMLType.Q8_0].type_size)
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))
    tie_block = ours[0, 1, :TYPE_INFO[GGMLType.Q8_0].type_size]
    assert list(tie_block[2:5].view(np.int8)) == [127, -15, -14]   # -14.5 -> -15, -13.5 -> -14


def test_quantize_q8_0_round_trip_error():
    x = q8_0_input().reshape(-1, QK)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    d_stored = d.astype(np.float16).astype(np.float32)
    error = np.abs(dequantize(quantize_q8_0(x), GGMLType.Q8_0, x.shape) - x)
    assert (error <= (d / 2 + 127 * np.abs(d - d_stored)) * (1 + 1e-6)).all()


def q8_k_scalar(x):
    """ggml's quantize_row_q8_K_ref written out one value at a time: (d, qs, bsums) per block."""
    out = []
    for block in x.reshape(-1, QK_K):
        amax, peak = 0.0, 0.0
        for v in block:
            if abs(v) > amax:
                amax, peak = abs(v), v
        if amax == 0:
            out.append((0.0, [0] * QK_K, [0] * 16))
            continue
        iscale = np.float32(-127) / peak
        qs = [min(127, int(np.rint(np.float32(iscale * v)))) for v in block]
        out.append((np.float32(1) / iscale, qs, [sum(qs[16 * i:16 * i + 16]) for i in range(16)]))
    return out


def test_quantize_q8_k_matches_ggml_reference():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2 * QK_K)).astype(np.float32)
    x[0, :QK_K] = 0
    x[1, QK_K:QK_K + 2] = [-9, 9]                      # equal magnitudes: the first one sets the sign
    raw = quantize_q8_k(x)
    assert raw.dtype == np.uint8 and raw.shape == (2, 2 * TYPE_INFO[GGMLType.Q8_K].type_size)
    blocks = raw.reshape(-1, TYPE_INFO[GGMLType.Q8_K].type_size)
    for block, (d, qs, bsums) in zip(blocks, q8_k_scalar(x)):
        assert block[0:4].view(np.float32)[0] == np.float32(d)
        assert list(block[4:260].view(np.int8)) == qs
        assert list(block[260:292].view(np.int16)) == bsums
    assert blocks[3, 0:4].view(np.float32)[0] > 0 and blocks[3, 4:6].view(np.int8).tolist() == [-127, 127]


def test_quantize_q8_k_round_trip_and_bsums():
    x = np.random.default_rng(3).standard_normal((4, QK_K)).astype(np.float32) * 5
    raw = quantize_q8_k(x).reshape(-1, TYPE_INFO[GGMLType.Q8_K].type_size)
    d = np.abs(raw[:, 0:4].view(np.float32))
    q = raw[:, 4:260].view(np.int8)
    assert np.abs(q).max() == 127
    np.testing.assert_array_equal(raw[:, 260:292].view(np.int16), q.reshape(-1, 16, 16).sum(axis=2))
    error = np.abs(dequantize(raw, GGMLType.Q8_K, x.shape) - x)
    assert (error <= d / 2 * (1 + 1e-5)).all()


# -- random blocks -------------------------------------------------------------------------------

@pytest.mark.parametrize("type", sorted(SUPPORTED_TYPES), ids=lambda t: t.name)
def test_random_blocks_decode_to_requested_scale(type):
    shape = (32, 1024)
    raw = random_blocks(type, shape, np.random.default_rng(4), scale=0.05)
    assert raw.dtype == np.uint8 and raw.size == TYPE_INFO[type].row_bytes(1024) * 32
    values = dequantize(raw, type, shape)
    assert np.isfinite(values).all()
    assert 0.04 < values.std() < 0.06
    assert abs(values.mean()) < 0.15 * 0.05
    np.testing.assert_array_equal(raw, random_blocks(type, shape, np.random.default_rng(4), scale=0.05))


def test_random_blocks_7b_sized_tensor():
    rows, cols = 4096, 14336
    raw = random_blocks(GGMLType.Q4_K, (rows, cols), np.random.default_rng(5))
    row_bytes = TYPE_INFO[GGMLType.Q4_K].row_bytes(cols)
    assert raw.size == rows * row_bytes
    assert np.isfinite(dequantize(raw[-4 * row_bytes:], GGMLType.Q4_K, (4, cols))).all()


def test_k_scale_min_packing_round_trips():
    rng = np.random.default_rng(6)
    scale, minimum = rng.integers(0, 64, size=(2, 5, 8), dtype=np.uint8)
    unpacked = _k_scale_min(_pack_k_scale_min(scale, minimum))
    np.testing.assert_array_equal(unpacked[0], scale)
    np.testing.assert_array_equal(unpacked[1], minimum)


# -- bad inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("type", [GGMLType.Q8_1, GGMLType.IQ2_XXS, 99], ids=str)
def test_unsupported_type(type):
    name = "unknown type id 99" if type == 99 else type.name
    with pytest.raises(ValueError, match=name):
        dequantize(np.zeros(36, np.uint8), type, (1, 32))
    with pytest.raises(ValueError, match=name):
        random_blocks(type, (1, 32), np.random.default_rng())


def test_random_blocks_rejects_q8_k():
    with pytest.raises(ValueError, match="Q8_K"):
        random_blocks(GGMLType.Q8_K, (1, QK_K), np.random.default_rng())


def test_wrong_byte_count():
    with pytest.raises(ValueError, match=r"Q4_0 tensor of shape \[2, 64\] needs 72 bytes, got 71"):
        dequantize(np.zeros(71, np.uint8), GGMLType.Q4_0, (2, 64))


def test_row_not_whole_blocks():
    with pytest.raises(ValueError, match=r"Q6_K tensor of shape \[2, 128\].*multiple of the block size 256"):
        dequantize(np.zeros(210, np.uint8), GGMLType.Q6_K, (2, 128))
    with pytest.raises(ValueError, match=r"Q4_K tensor of shape \[3, 100\]"):
        random_blocks(GGMLType.Q4_K, (3, 100), np.random.default_rng())
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(np.zeros((2, 48), np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q8_k(np.zeros(128, np.float32))


def test_not_bytes():
    with pytest.raises(ValueError, match="uint8"):
        dequantize(np.zeros(2, np.float32), GGMLType.F16, (4,))
