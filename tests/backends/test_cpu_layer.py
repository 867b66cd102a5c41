"""CPUBackend.decoder_layer (one native call per block) against the base-class default.

The default composes the ops; composed from the reference backend's ops it is the semantics,
composed from the CPU backend's own ops it is what the fused layer must equal bit for bit
(both use the same kernels in the same order).
"""
import numpy as np
import pytest

from zephyr.testing.blocks import random_blocks
from zephyr import quants
from zephyr.backend import Backend, LayerParams, LayerWeights, Weight
from zephyr.errors import BackendError
from zephyr.quants import GGMLType as T
from zephyr_backends.cpu import _ops
from zephyr_backends.cpu.backend import CPUBackend
from zephyr_backends.reference.backend import ReferenceBackend

D, F, HEADS, KV_HEADS, HEAD_DIM, N_CTX = 256, 512, 8, 2, 32, 40
CHUNKS = (9, 1, 1, 7, 1)   # a prefill at 0, decode steps, a prefill continuing at start_pos > 0

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
    return LayerWeights(*[backend.load_weight(getattr(weights, name)) for name in weights.__dataclass_fields__])


def params(neox=False, window=0, rope_dims=HEAD_DIM):
    return LayerParams(HEADS, KV_HEADS, HEAD_DIM, rope_dims, 10000.0, neox, 1e-5, window)


def run_chunks(layer_fn, backend, weights, p, cache, seed=1):
    """Outputs of `layer_fn` over CHUNKS of random inputs, on layer 1 of a two-layer cache."""
    rng = np.random.default_rng(seed)
    outputs, start = [], 0
    for n in CHUNKS:
        x = rng.standard_normal((n, D)).astype(np.float32)
        outputs.append(backend.to_host(layer_fn(backend, backend.from_host(x), weights, p, cache, 1, start)))
        start += n
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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("neox, window, rope_dims", [(False, 0, HEAD_DIM), (True, 5, 16)],
                         ids=["normal-full", "neox-window-partial"])
def test_fused_layer_matches_the_default(isa, layout, neox, window, rope_dims):
    weights, p = layer_weights(LAYOUTS[layout]), params(neox, window, rope_dims)
    cpu, reference = CPUBackend(threads=2), ReferenceBackend()
    cpu_weights = load(cpu, weights)
    got = run_chunks(fused, cpu, cpu_weights, p, cpu.new_kv_cache(2, N_CTX, KV_HEADS, HEAD_DIM))
    same_ops = run_chunks(composed, cpu, cpu_weights, p, cpu.new_kv_cache(2, N_CTX, KV_HEADS, HEAD_DIM))
    want = run_chunks(composed, reference, load(reference, weights), p,
                      reference.new_kv_cache(2, N_CTX, KV_HEADS, HEAD_DIM))
    for step, (g, s, w) in enumerate(zip(got, same_ops, want)):
        np.testing.assert_array_equal(g, s, err_msg=f"chunk {step}: fused differs from the CPU ops composed")
        error = float(np.max(np.abs(g - w)) / np.max(np.abs(w)))
        assert error < 1e-5, f"chunk {step}: normalised error {error:.3g} against the reference"


def test_fused_layer_is_identical_for_any_thread_count():
    weights, p = layer_weights(LAYOUTS["Q4_K_M"]), params()
    results = []
    for threads in (1, 2, 3):
        cpu = CPUBackend(threads=threads)
        results.append(run_chunks(fused, cpu, load(cpu, weights), p, cpu.new_kv_cache(2, N_CTX, KV_HEADS, HEAD_DIM)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_fused_layer_does_not_modify_its_input():
    cpu = CPUBackend(threads=2)
    x = np.random.default_rng(4).standard_normal((3, D)).astype(np.float32)
    before = x.copy()
    cpu.decoder_layer(x, load(cpu, layer_weights(LAYOUTS["Q4_1"])), params(), cpu.new_kv_cache(1, 8, KV_HEADS, HEAD_DIM), 0, 0)
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
    (dict(start_pos=7), "do not fit"),
    (dict(start_pos=-1), "start_pos"),
    (dict(layer=2), "layer"),
    (dict(cache=object()), "new_kv_cache"),
    (dict(p=LayerParams(HEADS, 3, HEAD_DIM, HEAD_DIM, 1e4, False, 1e-5, 0)), "kv heads"),
    (dict(p=LayerParams(HEADS, KV_HEADS, HEAD_DIM, 7, 1e4, False, 1e-5, 0)), "even"),
    (dict(p=LayerParams(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, 1e4, False, 1e-5, -1)), "sliding_window"),
    (dict(p=(8, 2)), "LayerParams"),
    (dict(w="weights"), "LayerWeights"),
    (dict(w=LayerWeights(*[f32(4, 4)] * 9)), "load_weight"),
])
def test_bad_arguments_raise(cpu, good, change, message):
    args = dict(x=f32(2, D), w=good, p=params(), cache=cpu.new_kv_cache(2, 8, KV_HEADS, HEAD_DIM), layer=0,
                start_pos=0) | change
    with pytest.raises(BackendError, match=message):
        cpu.decoder_layer(args["x"], args["w"], args["p"], args["cache"], args["layer"], args["start_pos"])


def test_mismatched_weight_shapes_raise(cpu, make_weight):
    weights = layer_weights(LAYOUTS["Q4_1"])
    swapped = LayerWeights(**{**{name: getattr(weights, name) for name in weights.__dataclass_fields__},
                              "wk": make_weight(T.Q4_1, (HEADS * HEAD_DIM, D))})
    with pytest.raises(BackendError, match="wk has shape"):
        cpu.decoder_layer(f32(1, D), load(cpu, swapped), params(), cpu.new_kv_cache(1, 8, KV_HEADS, HEAD_DIM), 0, 0)
