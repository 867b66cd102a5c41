"""The CPU matmul kernels on every instruction-set path this machine has, against numpy.

The reference is ReferenceBackend.matmul's definition: activations rounded through Q8_0 (legacy
weight types) or Q8_K (k-quants), then dequant(W) @ x in float64. Shapes are awkward on
purpose: row counts no tile height divides, one block and many, token counts that leave
remainder tiles.

Errors are measured against sum |w * x| of each output (what bounds a float dot product's
rounding error), not against the output itself, which may be small after cancellation.
"""
import numpy as np
import pytest

from zephyr.testing.blocks import random_blocks
from zephyr import quants
from zephyr.backend import Weight
from zephyr.quants import GGMLType, SUPPORTED_TYPES, TYPE_INFO
from zephyr_backends.cpu import _ops
from zephyr_backends.cpu.backend import CPUBackend
from zephyr_backends.reference.backend import ReferenceBackend

ISAS = _ops.available_isas()
TYPES = sorted(SUPPORTED_TYPES)
FLOAT_TYPES = {GGMLType.F32, GGMLType.F16, GGMLType.BF16}
TOLERANCE = 1e-5   # |got - want| / sum |w * x|: float32 sums of the same integer products


@pytest.fixture
def isa(request):
    """Force a path for one test, then go back to the best."""
    _ops.set_isa(request.param)
    yield request.param
    _ops.set_isa()


def widths(type):
    if type in FLOAT_TYPES:
        return [1, 13 * 32 + 7]
    block = TYPE_INFO[type].block_size
    return [block, block * (3 if block == 256 else 13)]


def rounded(x, type):
    """x as the kernels for `type` see it (ReferenceBackend.matmul's rounding)."""
    if type in FLOAT_TYPES:
        return x
    if TYPE_INFO[type].block_size == 32:
        return quants.dequantize(quants.quantize_q8_0(x), GGMLType.Q8_0, x.shape)
    return quants.dequantize(quants.quantize_q8_k(x), GGMLType.Q8_K, x.shape)


def matmul_error(got, x, type, data, m):
    """max |got - want| / sum |w * x| over the outputs, want being the reference's product."""
    want = ReferenceBackend().matmul(x, Weight("w", type, (m, x.shape[1]), data))
    w = quants.dequantize(data, type, (m, x.shape[1])).astype(np.float64)
    magnitude = np.abs(rounded(x, type)).astype(np.float64) @ np.abs(w).T
    return float(np.max(np.abs(got - want) / np.maximum(magnitude, 1e-30)))


def test_scalar_path_is_always_available():
    assert "scalar" in ISAS
    assert _ops.get_isa() == ISAS[-1]


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="not available"):
        _ops.set_isa("neon")
    assert _ops.get_isa() == ISAS[-1]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu"])
def test_gated_activations_match_float64_value_by_value(isa, gelu):
    """act(gate) * up through the vectorised exp, against float64 at every value (the conformance
    test measures against the largest only): gates from -30 to 30, the extremes, zeros, a count no
    vector width divides. Where the result is far below 1 the float32 argument's own rounding
    (|z| ulps) bounds the error, as for any float32 implementation."""
    gate = np.concatenate([np.linspace(-30, 30, 6001), [-100, 100, -1e4, 1e4, 0, -0.0, 1e-30, -1e-30]])
    gate = gate.astype(np.float32)
    up = np.random.default_rng(6).uniform(0.5, 2, gate.size).astype(np.float32)
    up[::2] *= -1
    got = np.empty_like(gate)
    (_ops.geglu if gelu else _ops.swiglu)(gate, up, got, 2)
    g = gate.astype(np.float64)
    z = 2 * np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3) if gelu else g   # gelu(g) = g sigmoid(2 y)
    with np.errstate(over="ignore"):
        want = g / (1 + np.exp(-z)) * up
    assert np.all(np.abs(got - want) <= 2e-6 * (1 + np.abs(z)) * np.abs(want) + 1e-35)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(isa, type):
    rng = np.random.default_rng(int(type))
    for k in widths(type):
        for m in (1, 5, 13, 37):
            data = random_blocks(type, (m, k), rng)
            for n in (1, 3, 17, 22):   # 17 and 22 tokens: prefill panels (panel.h), with remainders
                x = rng.standard_normal((n, k)).astype(np.float32)
                out = np.empty((n, m), np.float32)
                _ops.matmul(x, data, int(type), m, out, 2)
                error = matmul_error(out, x, type, data, m)
                assert error < TOLERANCE, f"{isa} {type.name} m={m} k={k} n={n}: error {error:.3g}"


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("type", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.F16], ids=lambda t: t.name)
def test_a_token_gets_the_same_value_alone_or_in_a_batch(isa, type):
    """A value depends neither on its tile position nor on the thread count."""
    rng = np.random.default_rng(1)
    m, k, n = 13, widths(type)[-1], 7
    data = random_blocks(type, (m, k), rng)
    x = rng.standard_normal((n, k)).astype(np.float32)
    batch = np.empty((n, m), np.float32)
    _ops.matmul(x, data, int(type), m, batch, 2)
    for i in range(n):
        for threads in (1, 3):
            alone = np.empty((1, m), np.float32)
            _ops.matmul(x[i:i + 1], data, int(type), m, alone, threads)
            np.testing.assert_array_equal(alone[0], batch[i])


def activation_cases(rng, k):
    yield rng.standard_normal((5, k)).astype(np.float32)
    yield (rng.standard_normal((5, k)) * 1e-4).astype(np.float32)          # Q8_0 scales below f16's normals
    ties = rng.integers(-127, 127, (5, k)).astype(np.float32) + 0.5        # x / d lands exactly on .5
    ties[:, ::32] = 127.0
    yield ties / np.float32(127.0) * np.float32(3.0)
    zeros = np.zeros((3, k), np.float32)
    zeros[1, 5] = -2.0
    yield zeros
    yield rng.integers(-4, 5, (5, k)).astype(np.float32) * np.float32(0.25)  # repeated peaks: the first wins
    yield (rng.standard_normal((3, k)) * 3e4).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("kind, reference", [("q8_0", quants.quantize_q8_0), ("q8_k", quants.quantize_q8_k)])
def test_activation_quantiser_matches_zephyr_quants_byte_for_byte(isa, kind, reference):
    rng = np.random.default_rng(2)
    for k in (256, 1024):
        for x in activation_cases(rng, k):
            np.testing.assert_array_equal(_ops.quantize_activations(np.ascontiguousarray(x), kind), reference(x))


def test_backend_matmul_uses_the_forced_path(make_weight):
    """CPUBackend.matmul goes through the same kernels on whatever path is forced."""
    weight = make_weight(GGMLType.Q5_K, (9, 512), seed=3)
    x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
    cpu = CPUBackend(threads=2)
    results = []
    for name in ISAS:
        _ops.set_isa(name)
        results.append(cpu.matmul(x, cpu.load_weight(weight)))
    _ops.set_isa()
    for name, got in zip(ISAS, results):
        assert matmul_error(got, x, weight.type, weight.data, 9) < TOLERANCE, name
