"""Weights the CPU backend interleaves at load (kernels/interleave.h: Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
Q3_K, and Q8_0 and the other k-quants with short rows or on Intel CPUs, on the AVX-512 path; every
one of these types on the AVX2 path, interleave_avx2.h).

The interleaved kernels are checked against the reference backend on awkward shapes (a partial
group of 16 rows, one block, an odd number of blocks, token counts with remainders), on every
path: weights interleaved for AVX-512 stay usable when a lower path is forced afterwards.
"""
import mmap
import os

import numpy as np
import pytest

from zephyr.testing.blocks import random_blocks
from zephyr import quants
from zephyr.backend import Weight
from zephyr.memory import release_pages
from zephyr.quants import GGMLType
from zephyr_backends.cpu import _ops
from zephyr_backends.cpu.backend import CPUBackend
from zephyr_backends.reference.backend import ReferenceBackend

needs_avx512 = pytest.mark.skipif("avx512" not in _ops.available_isas(), reason="interleaving is for the AVX-512 path")
TOLERANCE = 1e-5   # as test_cpu_kernels: |got - want| / sum |w * x|


TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
         GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]


def shapes(type):
    """(rows, cols): one row, a partial group, a whole group, several groups with a partial one;
    one block per row, an odd number of blocks, several."""
    block = quants.TYPE_INFO[type].block_size
    return [(1, block), (15, 7 * block), (16, 2 * block), (37, 5 * block)]


def activation_rounding(type, x):
    """x as the kernels see it: rounded to the 8-bit activation format of `type`'s kernels."""
    if quants.TYPE_INFO[type].activation_type == GGMLType.Q8_K:
        return quants.dequantize(quants.quantize_q8_k(x), GGMLType.Q8_K, x.shape)
    return quants.dequantize(quants.quantize_q8_0(x), GGMLType.Q8_0, x.shape)


def interleaved(data, m, k, type=GGMLType.Q4_0, isa="avx512"):
    _ops.set_isa(isa)
    try:
        return _ops.interleave(data, int(type), m, k, 2)
    finally:
        _ops.set_isa()


@needs_avx512
@pytest.mark.parametrize("isa", _ops.available_isas())
@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_interleaved_matmul_matches_reference(isa, type):
    rng = np.random.default_rng(5)
    for m, k in shapes(type):
        data = random_blocks(type, (m, k), rng)
        code, packed = interleaved(data, m, k, type)
        w = quants.dequantize(data, type, (m, k)).astype(np.float64)
        for n in (1, 2, 3, 4, 5, 6, 7, 17):   # every tail of the 4-token passes
            x = rng.standard_normal((n, k)).astype(np.float32)
            got = np.empty((n, m), np.float32)
            _ops.set_isa(isa)
            try:
                _ops.matmul(x, packed, code, m, got, 2)
            finally:
                _ops.set_isa()
            want = ReferenceBackend().matmul(x, Weight("w", type, (m, k), data))
            rounded = activation_rounding(type, x)
            magnitude = np.abs(rounded).astype(np.float64) @ np.abs(w).T
            error = float(np.max(np.abs(got - want) / np.maximum(magnitude, 1e-30)))
            assert error < TOLERANCE, f"{isa} m={m} k={k} n={n}: error {error:.3g}"


@needs_avx512
@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_interleaved_rows_decode_exactly(type):
    rng = np.random.default_rng(6)
    m, k = shapes(type)[-1]
    data = random_blocks(type, (m, k), rng)
    code, packed = interleaved(data, m, k, type)
    out = np.empty((m, k), np.float32)
    _ops.embed(packed, code, m, np.arange(m, dtype=np.int32)[::-1].copy(), out, 2)
    np.testing.assert_array_equal(out[::-1], quants.dequantize(data, type, (m, k)))


@needs_avx512
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_fast_copy_matches_the_word_by_word_copy(type, isa):
    rng = np.random.default_rng(10)
    for m, k in shapes(type):
        data = random_blocks(type, (m, k), rng)
        code, packed = interleaved(data, m, k, type, isa)
        want_code, want = _ops._interleave_reference(data, int(type), m, k)
        assert code == want_code
        np.testing.assert_array_equal(packed, want)


def cpu_is_intel() -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        return "GenuineIntel" in cpuinfo.read()


@needs_avx512
@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs Linux's /proc/cpuinfo for the CPU vendor")
def test_which_matrices_are_interleaved():
    _ops.set_isa("avx512")
    try:
        for type in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q2_K, GGMLType.Q3_K):
            assert _ops.interleaves(int(type), 4096) and _ops.interleaves(int(type), 14336)   # always
        for type in (GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):   # short rows always, long on Intel
            assert _ops.interleaves(int(type), 1536)
            assert _ops.interleaves(int(type), 4096) == cpu_is_intel()
        assert not _ops.interleaves(int(GGMLType.F16), 1536)
        _ops.set_isa("avx2")   # the types with an AVX2 kernel, any row length
        for type in TYPES:
            assert _ops.interleaves(int(type), 4096) and _ops.interleaves(int(type), 14336)
            assert not _ops.interleaves(int(type), 4096, False)
        assert not _ops.interleaves(int(GGMLType.F16), 4096, True)
        _ops.set_isa("scalar")
        assert not _ops.interleaves(int(GGMLType.Q4_0), 576, True)
    finally:
        _ops.set_isa()


@needs_avx512
@pytest.mark.parametrize("isa", _ops.available_isas())
@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_interleaved_kernels_hold_the_largest_sums(isa, type):
    """Every quant at its largest value against activations at full scale of either sign: the AVX2
    kernels add byte products in 16 bits before widening them, and must not overflow there."""
    m, k = 16, 512
    info = quants.TYPE_INFO[type]
    blocks = np.full((m, k // info.block_size, info.type_size), 0x80 if type == GGMLType.Q8_0 else 0xFF, np.uint8)
    # every f16 field (d, and the min where there is one) 0.5, where the type keeps it; the bytes
    # around stay 0xFF (Q3_K's and Q6_K's scales at their most negative, every quant at its top;
    # Q8_0's quants 0x80, -128)
    fields = {GGMLType.Q4_0: (0, 2), GGMLType.Q5_0: (0, 2), GGMLType.Q8_0: (0, 2), GGMLType.Q2_K: (-4, 0),
              GGMLType.Q3_K: (-2, 0), GGMLType.Q6_K: (-2, 0)}
    start, end = fields.get(type, (0, 4))
    blocks[:, :, start:end or None] = np.tile(np.array([0.5], np.float16).view(np.uint8), (end - start) // 2)
    data = blocks.reshape(-1)
    code, packed = interleaved(data, m, k, type)
    w = quants.dequantize(data, type, (m, k)).astype(np.float64)
    for sign in (1.0, -1.0):
        x = np.full((3, k), sign * 3.0, np.float32)
        got = np.empty((3, m), np.float32)
        _ops.set_isa(isa)
        try:
            _ops.matmul(x, packed, code, m, got, 1)
        finally:
            _ops.set_isa()
        want = activation_rounding(type, x).astype(np.float64) @ w.T
        assert np.all(np.isfinite(want)) and np.all(want != 0)
        np.testing.assert_allclose(got, want, rtol=1e-5)


@needs_avx512
def test_interleaved_buffers_are_checked():
    data = random_blocks(GGMLType.Q4_0, (20, 64), np.random.default_rng(7))
    code, packed = interleaved(data, 20, 64)
    with pytest.raises(ValueError, match="smaller"):     # 20 rows are read as two whole groups (32 rows)
        _ops.matmul(np.ones((1, 64), np.float32), packed[:20 * 36], code, 20, np.empty((1, 20), np.float32), 1)
    with pytest.raises(ValueError, match="smaller"):
        _ops.interleave(data[:-1], int(GGMLType.Q4_0), 20, 64, 1)
    bogus = code ^ int(GGMLType.Q4_0) | int(GGMLType.F16)   # an interleaved code no kernel reads
    with pytest.raises(ValueError, match="cannot multiply"):
        _ops.matmul(np.ones((1, 256), np.float32), packed, bogus, 1, np.empty((1, 1), np.float32), 1)
    with pytest.raises(ValueError, match="cannot decode"):
        _ops.embed(packed, bogus, 1, np.zeros(1, np.int32), np.empty((1, 256), np.float32), 1)


def test_backend_interleaves_once_and_keeps_values(make_weight):
    """Two loads of the same tensor (tied embeddings) give one handle; results match the reference."""
    weight = make_weight(GGMLType.Q4_0, (24, 96), seed=8)
    cpu = CPUBackend(threads=2)
    handle = cpu.load_weight(weight)
    assert cpu.load_weight(Weight("again", weight.type, weight.shape, weight.data)) is handle
    assert (handle.code != int(GGMLType.Q4_0)) == _ops.interleaves(int(GGMLType.Q4_0), 96)
    x = np.random.default_rng(8).standard_normal((3, 96)).astype(np.float32)
    np.testing.assert_allclose(cpu.matmul(x, handle), ReferenceBackend().matmul(x, weight), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(cpu.embed(handle, [0, 23]), ReferenceBackend().embed(weight, [0, 23]))


def test_release_pages_only_touches_read_only_file_maps(tmp_path):
    path = tmp_path / "data.bin"
    payload = np.random.default_rng(9).integers(0, 256, 5 * mmap.PAGESIZE, dtype=np.uint8)
    path.write_bytes(payload.tobytes())
    with open(path, "rb") as f:
        view = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)[100:4 * mmap.PAGESIZE]
        assert release_pages(view)
        np.testing.assert_array_equal(view, payload[100:4 * mmap.PAGESIZE])   # read again from the file
    anonymous = payload.copy()
    assert not release_pages(anonymous[mmap.PAGESIZE:])
    np.testing.assert_array_equal(anonymous, payload)
    with open(path, "r+b") as f:
        writable = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), np.uint8)
        writable[0] = 1
        assert not release_pages(writable)
        assert writable[0] == 1
