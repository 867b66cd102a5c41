"""CPUBackend.decoder_layer (one native call per block) against the base-class default.

The default composes the ops; composed from the reference backend's ops it is the semantics,
composed from the CPU backend's own ops it is what the fused layer must equal bit for bit
(both use the same kernels in the same order).
"""
from dataclasses import replace

import numpy as np
import pytest

from zephyr.testing.blocks import random_blocks
from zephyr import quants
from zephyr.backend import Backend, Batch, CacheShape, LayerParams, LayerWeights, RopeScaling, Weight
from zephyr.testing.layers import FAMILY_FEATURES, with_family_features
from zephyr.errors import BackendError
from zephyr.quants import GGMLType as T
from zephyr_backends.cpu import _ops
from zephyr_backends.cpu.backend import CPUBackend
from zephyr_backends.reference.backend import ReferenceBackend

D, F, HEADS, KV_HEADS, HEAD_DIM, N_CTX, N_SEQS = 256, 512, 8, 2, 32, 40, 2
# A prefill at 0, a decode step, a second sequence's prefill, a step mixing both sequences, and a
# prefill continuing at position 11.
BATCHES = (Batch.of(0, 9), Batch.of(9, 1), Batch.of(0, 6, seq=1), Batch([10, 6, 7], [0, 1, 1]), Batch.of(11, 7))

LAYOUTS = {
    "Q4_K_M": [T.Q4_K] * 6 + [T.Q6_K],
    "Q4_1": [T.Q4_1] * 7,
    "mixed": [T.Q8_0, T.Q4_K, T.F16, T.Q5_0, T.BF16, T.Q2_K, T.F32],
}


def layer_weights(types, seed=0):
    rng = np.random.default_rng(seed)

    def matrix(type, rows, cols):
        return Weight("w", type, (rows, cols), random_blocks(type, (rows, cols), rng, scale=0.05))

    def norm():
        values = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        return Weight("norm", T.F32, (D,), values.view(np.uint8))

    q, k, v, o, gate, up, down = types
    return LayerWeights(norm(), matrix(q, HEADS * HEAD_DIM, D), matrix(k, KV_HEADS * HEAD_DIM, D),
                        matrix(v, KV_HEADS * HEAD_DIM, D), matrix(o, D, HEADS * HEAD_DIM), norm(),
                        matrix(gate, F, D), matrix(up, F, D), matrix(down, D, F))


def load(backend, weights):
    return LayerWeights(**{name: backend.load_weight(w) for name, w in weights.present().items()})


def params(neox=False, window=0, rope_dims=HEAD_DIM):
    return LayerParams(HEADS, KV_HEADS, HEAD_DIM, rope_dims, 10000.0, neox, 1e-5, window)


def cache(backend, type=T.F16, n_layers=2, n_ctx=N_CTX):
    return backend.new_kv_cache(CacheShape(n_layers, N_SEQS, n_ctx, KV_HEADS, HEAD_DIM, type))


def run_batches(layer_fn, backend, weights, p, cache, batches=BATCHES, seed=1):
    """Outputs of `layer_fn` over `batches` of random inputs, on layer 1 of a two-layer cache."""
    rng = np.random.default_rng(seed)
    outputs = []
    for batch in batches:
        x = rng.standard_normal((len(batch), D)).astype(np.float32)
        outputs.append(backend.to_host(layer_fn(backend, backend.from_host(x), weights, p, cache, 1, batch)))
    return outputs


def fused(backend, *args):
    return backend.decoder_layer(*args)


def composed(backend, *args):
    return Backend.decoder_layer(backend, *args)


@pytest.fixture(params=_ops.available_isas())
def isa(request):
    _ops.set_isa(request.param)
    yield request.param
    _ops.set_isa()


# The fused layer against the reference composition: both round the cached keys and values, and a
# float-order difference upstream can move a value across a rounding boundary of the cache type.
REFERENCE_TOLERANCE = {T.F32: 1e-5, T.F16: 1e-4, T.Q8_0: 2e-2}


def assert_fused_matches(weights, p, type=T.F16, batches=BATCHES, n_ctx=N_CTX, tolerance=None):
    cpu, reference = CPUBackend(threads=2), ReferenceBackend()
    cpu_weights = load(cpu, weights)
    got = run_batches(fused, cpu, cpu_weights, p, cache(cpu, type, n_ctx=n_ctx), batches)
    same_ops = run_batches(composed, cpu, cpu_weights, p, cache(cpu, type, n_ctx=n_ctx), batches)
    want = run_batches(composed, reference, load(reference, weights), p, cache(reference, type, n_ctx=n_ctx), batches)
    for step, (g, s, w) in enumerate(zip(got, same_ops, want)):
        np.testing.assert_array_equal(g, s, err_msg=f"batch {step}: fused differs from the CPU ops composed")
        error = float(np.max(np.abs(g - w)) / np.max(np.abs(w)))
        tolerance = tolerance or REFERENCE_TOLERANCE[type]
        assert error < tolerance, f"batch {step}: normalised error {error:.3g} against the reference"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("neox, window, rope_dims", [(False, 0, HEAD_DIM), (True, 5, 16)],
                         ids=["normal-full", "neox-window-partial"])
def test_fused_layer_matches_the_default(isa, layout, neox, window, rope_dims):
    assert_fused_matches(layer_weights(LAYOUTS[layout]), params(neox, window, rope_dims))


@pytest.mark.parametrize("family", FAMILY_FEATURES)
@pytest.mark.parametrize("layout", ["F32", "Q4_K_M"])
def test_fused_layer_matches_the_default_with_each_familys_features(isa, layout, family):
    """Equal to the CPU ops composed, bit for bit. Against the reference: float weights and an f32
    cache round nothing, so float64 meets float32 within 1e-5; with 8-bit activations (Q4_K_M) one
    value crossing a rounding boundary moves the output by up to ~1/127 of a block's scale."""
    types = [T.F32] * 7 if layout == "F32" else LAYOUTS[layout]
    weights, p = with_family_features(layer_weights(types), params(), family)
    assert_fused_matches(weights, p, type=T.F32, tolerance=1e-5 if layout == "F32" else 5e-3)


def test_every_feature_changes_the_block():
    """Each family's flags move the output well past the tolerances above: none is silently ignored."""
    cpu = CPUBackend(threads=2)
    plain = layer_weights(LAYOUTS["Q4_1"])
    want = run_batches(fused, cpu, load(cpu, plain), params(), cache(cpu))
    for family in FAMILY_FEATURES:
        weights, p = with_family_features(plain, params(), family)
        got = run_batches(fused, cpu, load(cpu, weights), p, cache(cpu))
        error = max(float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want))
        assert error > 0.05, f"{family}: the features changed the output by only {error:.3g}"


@pytest.mark.parametrize("type", [T.F32, T.Q8_0], ids=lambda t: t.name)
def test_fused_layer_matches_the_default_for_every_cache_type(isa, type):
    assert_fused_matches(layer_weights(LAYOUTS["Q4_K_M"]), params(window=7), type)


@pytest.mark.parametrize("window", [0, 300])
def test_fused_layer_matches_the_default_at_a_long_context(window):
    """Decode past ZD_ATT_SPLIT_KEYS keys: a lone token's keys are split into shares, then merged.
    Float weights: no activation rounding, whose boundary crossings over 600 tokens would hide
    small attention errors."""
    batches = (Batch.of(0, 530), Batch.of(530, 1), Batch.of(0, 3, seq=1), Batch([531, 3], [0, 1]), Batch.of(532, 70))
    assert_fused_matches(layer_weights([T.F32] * 7), params(window=window), batches=batches, n_ctx=700)


def test_fused_layer_is_identical_for_any_thread_count():
    weights, p = layer_weights(LAYOUTS["Q4_K_M"]), params()
    batches = BATCHES + (Batch.of(18, 600 - 18), Batch.of(600, 1))
    results = []
    for threads in (1, 2, 3):
        cpu = CPUBackend(threads=threads)
        results.append(run_batches(fused, cpu, load(cpu, weights), p, cache(cpu, n_ctx=700), batches))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_fused_layer_does_not_modify_its_input():
    cpu = CPUBackend(threads=2)
    x = np.random.default_rng(4).standard_normal((3, D)).astype(np.float32)
    before = x.copy()
    cpu.decoder_layer(x, load(cpu, layer_weights(LAYOUTS["Q4_1"])), params(), cache(cpu, n_layers=1, n_ctx=8), 0,
                      Batch.of(0, 3))
    np.testing.assert_array_equal(x, before)


@pytest.fixture(scope="module")
def cpu():
    return CPUBackend(threads=2)


@pytest.fixture(scope="module")
def good(cpu):
    return load(cpu, layer_weights(LAYOUTS["Q4_1"]))


def f32(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("change, message", [
    (dict(x=f32(2, D + 32)), "width"),
    (dict(x=np.zeros((2, D))), "float32"),
    (dict(x=f32(3, D)), "rows"),
    (dict(batch=Batch.of(7, 2)), "does not fit"),
    (dict(batch=Batch.of(0, 2, seq=2)), "sequence 2"),
    (dict(batch=(0, 1)), "Batch"),
    (dict(layer=2), "layer"),
    (dict(cache=object()), "new_kv_cache"),
    (dict(p=LayerParams(HEADS, 3, HEAD_DIM, HEAD_DIM, 1e4, False, 1e-5, 0)), "kv heads"),
    (dict(p=LayerParams(HEADS, KV_HEADS, HEAD_DIM, 7, 1e4, False, 1e-5, 0)), "even"),
    (dict(p=LayerParams(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, 1e4, False, 1e-5, -1)), "sliding_window"),
    (dict(p=(8, 2)), "LayerParams"),
    (dict(p=replace(params(), activation="relu")), "activation"),
    (dict(p=replace(params(), attn_softcap=-1.0)), "attn_softcap"),
    (dict(p=replace(params(), rope_scaling=RopeScaling(freq_scale=0.0))), "freq_scale"),
    (dict(w="weights"), "LayerWeights"),
    (dict(w=LayerWeights(*[f32(4, 4)] * 9)), "load_weight"),
])
def test_bad_arguments_raise(cpu, good, change, message):
    args = dict(x=f32(2, D), w=good, p=params(), cache=cache(cpu, n_ctx=8), layer=0, batch=Batch.of(0, 2)) | change
    with pytest.raises(BackendError, match=message):
        cpu.decoder_layer(args["x"], args["w"], args["p"], args["cache"], args["layer"], args["batch"])


def test_mismatched_optional_vectors_raise(cpu):
    weights, p = with_family_features(layer_weights(LAYOUTS["Q4_1"]), params(), "qwen3")
    half = np.ones(HEAD_DIM // 2, np.float32)
    short = replace(weights, q_norm=Weight("q_norm", T.F32, half.shape, half.view(np.uint8)))
    with pytest.raises(BackendError, match="q_norm has 16 values, but the layer's shapes need 32"):
        cpu.decoder_layer(f32(1, D), load(cpu, short), p, cache(cpu, n_layers=1, n_ctx=8), 0, Batch.of(0, 1))


def test_mismatched_weight_shapes_raise(cpu, make_weight):
    weights = layer_weights(LAYOUTS["Q4_1"])
    swapped = LayerWeights(**{**{name: getattr(weights, name) for name in weights.__dataclass_fields__},
                              "wk": make_weight(T.Q4_1, (HEADS * HEAD_DIM, D))})
    with pytest.raises(BackendError, match="wk is \\[256, 256\\], but the layer.s shapes need \\[64, 256\\]"):
        cpu.decoder_layer(f32(1, D), load(cpu, swapped), params(), cache(cpu, n_layers=1, n_ctx=8), 0, Batch.of(0, 1))
