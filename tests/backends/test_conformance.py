"""One suite: every op of every available backend against the reference backend, and the
contract's other promises (KV cache types, batches of several sequences, moving sequences).

A third-party backend that is installed and available on this machine is tested here too.
"""
import numpy as np
import pytest

from zephyr import plugins
from zephyr.backend import (KV_CACHE_TYPES, Backend, Batch, CacheShape, HostKVCache, LayerParams, LayerWeights,
                            RopeScaling, Weight, choose_decoder_layer, load_layer_weights, load_optional_weight,
                            needs_host_cache)
from zephyr.errors import BackendError
from zephyr.quants import GGMLType, SUPPORTED_TYPES, TYPE_INFO
from zephyr.testing.layers import FAMILY_FEATURES, YARN, with_family_features

TOLERANCE = 1e-4  # max |got - want| / max |want|, float32 arithmetic against a float64 oracle

FLOAT_TYPES = {GGMLType.F32, GGMLType.F16, GGMLType.BF16}
TYPES = sorted(SUPPORTED_TYPES)


def backends_under_test():
    """Every installed backend class that can run here (the reference included)."""
    return [cls for cls in plugins.backend_classes().values() if cls.availability()]


@pytest.fixture(params=backends_under_test(), ids=lambda cls: cls.name)
def backend(request):
    cls = request.param
    return cls(**({"threads": 2} if "threads" in cls.options else {}))


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


@pytest.mark.parametrize("start", [0, 37])
@pytest.mark.parametrize("n_rot", [64, 32, 16])
@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
def test_rope(backend, reference, neox, n_rot, start):
    x = activations(np.random.default_rng(3), 5, 3 * 64)
    for positions in (np.arange(start, start + 5), np.array([start, 3, 900, 3, 0])):
        args = (positions.astype(np.int32), 64, n_rot, 10000.0, neox)
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


# -- the ops of block features ---------------------------------------------------------------------
# Weights reach them as the runtime hands them over: loaded where the backend lists the feature,
# as host Weights for the contract's host defaults otherwise (zephyr.backend.load_optional_weight).

def vector(values):
    values = np.asarray(values, np.float32)
    return Weight("v", GGMLType.F32, values.shape, values.view(np.uint8))


def test_add_bias(backend, reference):
    rng = np.random.default_rng(14)
    x, b = activations(rng, 5, 333), vector(rng.standard_normal(333))
    got = run(backend, "add_bias", x, load_optional_weight(backend, "bias", b))
    assert_close(got, reference.add_bias(x, b))


def test_rms_norm_heads(backend, reference):
    rng = np.random.default_rng(15)
    x, w = activations(rng, 5, 3 * 64) * 3, vector(1 + 0.3 * rng.standard_normal(64))
    got = run(backend, "rms_norm_heads", x, load_optional_weight(backend, "qk_norm", w), 64, 1e-6)
    assert_close(got, reference.rms_norm_heads(x, w, 64, 1e-6))


def test_geglu(backend, reference):
    rng = np.random.default_rng(16)
    gate = activations(rng, 5, 333) * 4
    gate[0, :4] = [-100.0, 100.0, -1e4, 1e4]   # gelu must not overflow at the extremes
    up = activations(rng, 5, 333)
    assert_close(run(backend, "geglu", gate, up), reference.geglu(gate, up))


def test_scale(backend, reference):
    x = activations(np.random.default_rng(17), 5, 333)
    assert_close(run(backend, "scale", x, 25.3), reference.scale(x, 25.3))


ROPE_SCALINGS = {"linear": RopeScaling(freq_scale=0.125), "yarn": YARN, "magnitude": RopeScaling(attn_factor=1.19)}


@pytest.mark.parametrize("factors", [False, True], ids=["", "freq-factors"])
@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
def test_rope_scaling(backend, reference, neox, scaling, factors):
    if "rope_scaling" not in backend.features:
        pytest.skip(f"{backend.name} rotates with scaling on the host (test_decoder_layer_with_family_features)")
    rng = np.random.default_rng(18)
    x = activations(rng, 5, 3 * 64)
    freqs = vector(rng.uniform(1, 8, 32)) if factors else None
    for positions in (np.arange(37, 42), np.array([37, 3, 900, 3, 0])):
        args = (positions.astype(np.int32), 64, 64, 10000.0, neox)
        got = run(backend, "rope", x, *args, scaling=ROPE_SCALINGS[scaling],
                  freq_factors=freqs and backend.load_weight(freqs))
        assert_close(got, reference.rope(x, *args, scaling=ROPE_SCALINGS[scaling], freq_factors=freqs))


# -- attention ---------------------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, N_CTX = 8, 2, 32, 24
CACHE_TYPES = sorted(KV_CACHE_TYPES.values())


def caches(backend, reference, type, n_layers=2, n_seqs=1, n_ctx=N_CTX):
    if type not in backend.kv_cache_types:
        pytest.skip(f"{backend.name} keeps no {type.name} KV cache")
    shape = CacheShape(n_layers, n_seqs, n_ctx, KV_HEADS, HEAD_DIM, type)
    return backend.new_kv_cache(shape), reference.new_kv_cache(shape)


def attend(backend, reference, cache, ref_cache, batch, rng, window=0, layer=1, scale=1.0):
    """Run one batch through both backends' attention and compare."""
    n = len(batch)
    q = activations(rng, n, HEADS * HEAD_DIM) * scale
    k = activations(rng, n, KV_HEADS * HEAD_DIM) * scale
    v = activations(rng, n, KV_HEADS * HEAD_DIM)
    args = (layer, q, k, v, batch, HEADS, KV_HEADS)
    assert_close(run(backend, "attention", cache, *args, window=window),
                 reference.attention(ref_cache, *args, window=window))


@pytest.mark.parametrize("type", CACHE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("window", [0, 4])
def test_attention_prefill_then_decode(backend, reference, type, window):
    """Prefill, a prefill continuing at position 6, then decode steps, on layer 1 of 2."""
    rng = np.random.default_rng(6 + window)
    cache, ref_cache = caches(backend, reference, type)
    start = 0
    for n in (6, 5, 1, 1):
        attend(backend, reference, cache, ref_cache, Batch.of(start, n), rng, window)
        start += n


@pytest.mark.parametrize("type", CACHE_TYPES, ids=lambda t: t.name)
def test_attention_over_several_sequences(backend, reference, type):
    """Sequences fill independently; one batch mixes a decode step of one with a prompt of another."""
    rng = np.random.default_rng(9)
    cache, ref_cache = caches(backend, reference, type, n_seqs=3)
    for batch in (Batch.of(0, 5, seq=2), Batch.of(0, 3, seq=0), Batch([5, 3, 4, 0], [2, 0, 0, 1]),
                  Batch([6, 5, 1, 2], [2, 0, 1, 1])):
        attend(backend, reference, cache, ref_cache, batch, rng, window=4)


@pytest.mark.parametrize("window", [0, 700])
def test_attention_at_a_long_context(backend, reference, window):
    """Over 1,000 keys: kernels that tile or split the keys of a decode step meet their seams."""
    rng = np.random.default_rng(10)
    cache, ref_cache = caches(backend, reference, GGMLType.F16, n_layers=1, n_ctx=1100)
    for batch in (Batch.of(0, 1037), Batch.of(1037, 1), Batch.of(1038, 3)):
        attend(backend, reference, cache, ref_cache, batch, rng, window, layer=0)


@pytest.mark.parametrize("scores", [dict(scale=0.3), dict(softcap=2.0), dict(scale=0.5, softcap=1.5)],
                         ids=["scale", "softcap", "both"])
def test_attention_score_scale_and_softcap(backend, reference, scores):
    needs = {"scale": "attn_scale", "softcap": "attn_softcap"}
    if not {needs[name] for name in scores} <= backend.features:
        pytest.skip(f"{backend.name} does not scale or cap scores itself (test_decoder_layer_with_family_features)")
    rng = np.random.default_rng(19)
    cache, ref_cache = caches(backend, reference, GGMLType.F32, n_ctx=700)
    for batch in (Batch.of(0, 9), Batch.of(9, 1), Batch.of(10, 600)):
        n = len(batch)
        q = activations(rng, n, HEADS * HEAD_DIM) * 2
        k, v = activations(rng, n, KV_HEADS * HEAD_DIM) * 2, activations(rng, n, KV_HEADS * HEAD_DIM)
        args = (1, q, k, v, batch, HEADS, KV_HEADS)
        assert_close(run(backend, "attention", cache, *args, window=300, **scores),
                     reference.attention(ref_cache, *args, window=300, **scores))


def test_attention_softmax_is_stable(backend, reference):
    cache, ref_cache = caches(backend, reference, GGMLType.F32, n_layers=1, n_ctx=4)
    attend(backend, reference, cache, ref_cache, Batch.of(0, 3), np.random.default_rng(7), layer=0, scale=300)


@pytest.mark.parametrize("type", CACHE_TYPES, ids=lambda t: t.name)
def test_sequences_move_between_slots(backend, reference, type):
    """copy_sequence and read/write_sequence carry a prefix, so attention over the copy is
    attention over the original."""
    rng = np.random.default_rng(11)
    cache, ref_cache = caches(backend, reference, type, n_seqs=3)
    attend(backend, reference, cache, ref_cache, Batch.of(0, 7, seq=0), rng)
    for c in (cache, ref_cache):
        c.copy_sequence(0, 1, 7)
        c.write_sequence(2, c.read_sequence(0, 5))
    attend(backend, reference, cache, ref_cache, Batch([7, 7, 5], [0, 1, 2]), rng)
    assert isinstance(cache.read_sequence(1, 8), np.ndarray) and cache.read_sequence(1, 8).dtype == np.uint8
    with pytest.raises(BackendError, match="sequence 3"):
        cache.copy_sequence(0, 3, 1)


# -- the whole block ------------------------------------------------------------------------------

D_MODEL, D_FFN = 256, 512


def block_weights(make_weight, type):
    rng = np.random.default_rng(12)
    norm = lambda: (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)  # noqa: E731
    from zephyr.backend import Weight
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = dict(wq=(q, D_MODEL), wk=(kv, D_MODEL), wv=(kv, D_MODEL), wo=(D_MODEL, q), w_gate=(D_FFN, D_MODEL),
                  w_up=(D_FFN, D_MODEL), w_down=(D_MODEL, D_FFN))
    matrices = {name: make_weight(type, shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    norms = {name: Weight(name, GGMLType.F32, (D_MODEL,), norm().view(np.uint8)) for name in ("attn_norm", "ffn_norm")}
    return LayerWeights(**matrices, **norms)


@pytest.mark.parametrize("type", [GGMLType.F32, GGMLType.Q8_0], ids=lambda t: t.name)
def test_decoder_layer(backend, reference, make_weight, type):
    """The block a backend runs (fused or not) against the default composition on the reference."""
    weights = block_weights(make_weight, type)
    p = LayerParams(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM // 2, 10000.0, True, 1e-5, 5)
    loaded = {b: LayerWeights(**{f: b.load_weight(w) for f, w in weights.present().items()})
              for b in (backend, reference)}
    cache, ref_cache = caches(backend, reference, GGMLType.F32, n_seqs=2)
    rng = np.random.default_rng(13)
    for batch in (Batch.of(0, 7), Batch.of(0, 2, seq=1), Batch([7, 2], [0, 1])):
        x = activations(rng, len(batch), D_MODEL)
        got = run(backend, "decoder_layer", x, loaded[backend], p, cache, 1, batch)
        want = Backend.decoder_layer(reference, x, loaded[reference], p, ref_cache, 1, batch)
        assert_close(got, want)


@pytest.mark.parametrize("family", FAMILY_FEATURES)
def test_decoder_layer_with_family_features(backend, reference, make_weight, family):
    """Each family's block as the runtime runs it (zephyr.backend.choose_decoder_layer): the backend's
    own decoder_layer when it lists every feature the block uses, else the default composition with
    the features it lacks on the host, over a host cache where the backend cannot cap scores."""
    weights, p = with_family_features(block_weights(make_weight, GGMLType.F32),
                                      LayerParams(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, 10000.0, False, 1e-5, 0), family)
    shape = CacheShape(2, 2, N_CTX, KV_HEADS, HEAD_DIM, GGMLType.F32)
    cache = HostKVCache(shape) if needs_host_cache(backend, p) else backend.new_kv_cache(shape)
    ref_cache = reference.new_kv_cache(shape)
    layer, want_layer = load_layer_weights(backend, weights), load_layer_weights(reference, weights)
    run_block = choose_decoder_layer(backend, layer, p)
    rng = np.random.default_rng(20)
    for batch in (Batch.of(0, 7), Batch.of(0, 2, seq=1), Batch([7, 2], [0, 1])):
        x = activations(rng, len(batch), D_MODEL)
        got = backend.to_host(run_block(backend.from_host(x), layer, p, cache, 1, batch))
        assert_close(got, Backend.decoder_layer(reference, x, want_layer, p, ref_cache, 1, batch))


# -- errors every backend reports ------------------------------------------------------------

def test_cache_overflow_raises(backend):
    cache = backend.new_kv_cache(CacheShape(1, 1, 4, KV_HEADS, HEAD_DIM))
    rng = np.random.default_rng(8)
    q = backend.from_host(activations(rng, 2, HEADS * HEAD_DIM))
    kv = backend.from_host(activations(rng, 2, KV_HEADS * HEAD_DIM))
    with pytest.raises(BackendError, match="cache"):
        backend.attention(cache, 0, q, kv, kv, Batch.of(3, 2), HEADS, KV_HEADS)


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
