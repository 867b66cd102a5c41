"""One suite: every op of every available backend against the reference backend.

A third-party backend that is installed and available on this machine is tested here too.
"""
import numpy as np
import pytest

from zephyr import plugins
from zephyr.errors import BackendError
from zephyr.quants import GGMLType, SUPPORTED_TYPES, TYPE_INFO

TOLERANCE = 1e-4  # max |got - want| / max |want|, float32 arithmetic against a float64 oracle

FLOAT_TYPES = {GGMLType.F32, GGMLType.F16, GGMLType.BF16}
TYPES = sorted(SUPPORTED_TYPES)


def backends_under_test():
    """Every installed backend class that can run here (the reference included)."""
    return [cls for cls in plugins.backend_classes().values() if cls.availability()]


@pytest.fixture(params=backends_under_test(), ids=lambda cls: cls.name)
def backend(request):
    return request.param(threads=2)


@pytest.fixture(scope="module")
def reference():
    return plugins.get_backend_class("reference")()


def assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
    assert np.all(np.isfinite(got)), "non-finite values"
    scale = max(float(np.max(np.abs(want))), 1e-30) if want.size else 1.0
    error = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    assert error < TOLERANCE, f"normalised error {error:.3g}"


def widths(type):
    """Awkward row widths for `type`: one block, and many (a count no unroll divides)."""
    if type in FLOAT_TYPES:
        return {"one": 1, "many": 13 * 32 + 7}
    block = TYPE_INFO[type].block_size
    return {"one": block, "many": block * (5 if block == 256 else 13)}


def activations(rng, n, k):
    return rng.standard_normal((n, k)).astype(np.float32)


def run(backend, op, *args, **kwargs):
    """Call `op` on `backend` with host arrays moved in and the result moved out."""
    args = [backend.from_host(a) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a for a in args]
    return backend.to_host(getattr(backend, op)(*args, **kwargs))


# -- matmul / embed --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("width", ["one", "many"])
@pytest.mark.parametrize("m", [7, 33])
@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_matmul(backend, reference, make_weight, type, m, width, n):
    k = widths(type)[width]
    weight = make_weight(type, (m, k), seed=m + k)
    x = activations(np.random.default_rng(n), n, k)
    got = run(backend, "matmul", x, backend.load_weight(weight))
    assert_close(got, reference.matmul(x, reference.load_weight(weight)))


@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_embed(backend, reference, make_weight, type):
    weight = make_weight(type, (33, widths(type)["many"]), seed=1)
    ids = np.array([0, 32, 5, 5, 17], dtype=np.int32)
    got = run(backend, "embed", backend.load_weight(weight), ids)
    assert_close(got, reference.embed(reference.load_weight(weight), ids))


# -- row-wise ops ------------------------------------------------------------------------------

def test_rms_norm(backend, reference, make_weight):
    weight = make_weight(GGMLType.F32, (419,), seed=2)
    x = activations(np.random.default_rng(2), 5, 419)
    got = run(backend, "rms_norm", x, backend.load_weight(weight), 1e-5)
    assert_close(got, reference.rms_norm(x, reference.load_weight(weight), 1e-5))


@pytest.mark.parametrize("start_pos", [0, 37])
@pytest.mark.parametrize("n_rot", [64, 32, 16])
@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
def test_rope(backend, reference, neox, n_rot, start_pos):
    x = activations(np.random.default_rng(3), 5, 3 * 64)
    args = (start_pos, 64, n_rot, 10000.0, neox)
    assert_close(run(backend, "rope", x, *args), reference.rope(x, *args))


def test_swiglu(backend, reference):
    rng = np.random.default_rng(4)
    gate = activations(rng, 5, 333) * 4
    gate[0, :4] = [-100.0, 100.0, -1e4, 1e4]   # silu must not overflow at the extremes
    up = activations(rng, 5, 333)
    assert_close(run(backend, "swiglu", gate, up), reference.swiglu(gate, up))


def test_add(backend, reference):
    rng = np.random.default_rng(5)
    a, b = activations(rng, 5, 333), activations(rng, 5, 333)
    assert_close(run(backend, "add", a, b), reference.add(a, b))


# -- attention ---------------------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, N_CTX = 8, 2, 16, 24


@pytest.mark.parametrize("window", [0, 4])
def test_attention_prefill_then_decode(backend, reference, window):
    """Prefill, a prefill continuing at start_pos > 0, then decode steps, on layer 1 of 2."""
    rng = np.random.default_rng(6 + window)
    caches = {b: b.new_kv_cache(2, N_CTX, KV_HEADS, HEAD_DIM) for b in (backend, reference)}
    start = 0
    for n in (6, 5, 1, 1):
        q = activations(rng, n, HEADS * HEAD_DIM)
        k = activations(rng, n, KV_HEADS * HEAD_DIM)
        v = activations(rng, n, KV_HEADS * HEAD_DIM)
        args = (1, q, k, v, start, HEADS, KV_HEADS)
        got = run(backend, "attention", caches[backend], *args, window=window)
        assert_close(got, reference.attention(caches[reference], *args, window=window))
        start += n


def test_attention_softmax_is_stable(backend, reference):
    rng = np.random.default_rng(7)
    q = activations(rng, 3, HEADS * HEAD_DIM) * 300   # logits in the thousands
    k = activations(rng, 3, KV_HEADS * HEAD_DIM) * 300
    v = activations(rng, 3, KV_HEADS * HEAD_DIM)
    args = (0, q, k, v, 0, HEADS, KV_HEADS)
    got = run(backend, "attention", backend.new_kv_cache(1, 4, KV_HEADS, HEAD_DIM), *args)
    assert_close(got, reference.attention(reference.new_kv_cache(1, 4, KV_HEADS, HEAD_DIM), *args))


# -- errors every backend reports ------------------------------------------------------------

def test_cache_overflow_raises(backend):
    cache = backend.new_kv_cache(1, 4, KV_HEADS, HEAD_DIM)
    rng = np.random.default_rng(8)
    q = backend.from_host(activations(rng, 2, HEADS * HEAD_DIM))
    kv = backend.from_host(activations(rng, 2, KV_HEADS * HEAD_DIM))
    with pytest.raises(BackendError, match="cache"):
        backend.attention(cache, 0, q, kv, kv, 3, HEADS, KV_HEADS)


def test_partial_block_rows_are_rejected(backend, make_weight):
    weight = make_weight(GGMLType.Q4_K, (2, 256))
    truncated = type(weight)(weight.name, weight.type, (2, 100), weight.data)
    with pytest.raises(BackendError, match="block"):
        backend.load_weight(truncated)


def test_unsupported_type_is_rejected(backend):
    from zephyr.backend import Weight
    weight = Weight("w", GGMLType.IQ2_XXS, (1, 256), np.zeros(TYPE_INFO[GGMLType.IQ2_XXS].type_size, np.uint8))
    with pytest.raises(BackendError, match="not supported"):
        backend.load_weight(weight)


def test_matmul_width_mismatch_raises(backend, make_weight):
    weight = backend.load_weight(make_weight(GGMLType.Q8_0, (4, 64)))
    with pytest.raises(BackendError):
        backend.matmul(backend.from_host(np.zeros((1, 32), np.float32)), weight)


def test_token_id_out_of_range_raises(backend, make_weight):
    weight = backend.load_weight(make_weight(GGMLType.Q8_0, (4, 64)))
    with pytest.raises(BackendError, match="token ids"):
        backend.embed(weight, np.array([4], dtype=np.int32))
