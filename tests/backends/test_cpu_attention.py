"""The CPU backend's attention kernels (kernels/attention.h) against the reference backend, on
every instruction-set path, at the sizes where their paths part: head sizes that are and are not
a multiple of 16 or 32 (f16 tiles read in place, or decoded into float tiles), query groups of 1
to 8 heads (blocks of 4 rows and their remainders), contexts that are not a multiple of the tile,
decode steps long enough to be split into shares, sliding windows, every cache type, 1 and 2
threads.

test_conformance.py checks the contract at one shape; this file walks the kernels' seams.
"""
import numpy as np
import pytest

from zephyr.backend import KV_CACHE_TYPES, Batch, CacheShape
from zephyr.quants import GGMLType
from zephyr_backends.cpu import _ops
from zephyr_backends.cpu.backend import CPUBackend
from zephyr_backends.reference.backend import ReferenceBackend

TOLERANCE = 1e-4   # as test_conformance: max |got - want| / max |want|


@pytest.fixture(params=_ops.available_isas())
def isa(request):
    _ops.set_isa(request.param)
    yield request.param
    _ops.set_isa()


def run(threads, type, head_dim, n_heads, n_kv, batches, window=0, n_ctx=None):
    """Attention over `batches` in turn (keys and values stored as they go), CPU against the
    reference; returns the largest normalised error."""
    n_ctx = n_ctx or max(int(b.positions.max()) for b in batches) + 1
    shape = CacheShape(1, 2, n_ctx, n_kv, head_dim, type)
    cpu, ref = CPUBackend(threads=threads), ReferenceBackend()
    cache, ref_cache = cpu.new_kv_cache(shape), ref.new_kv_cache(shape)
    rng = np.random.default_rng(head_dim * 100 + n_heads * 10 + n_kv)
    worst = 0.0
    for batch in batches:
        n = len(batch)
        q = rng.standard_normal((n, n_heads * head_dim)).astype(np.float32)
        k = rng.standard_normal((n, n_kv * head_dim)).astype(np.float32)
        v = rng.standard_normal((n, n_kv * head_dim)).astype(np.float32)
        args = (0, q, k, v, batch, n_heads, n_kv)
        got = cpu.to_host(cpu.attention(cache, *args, window=window))
        want = ref.attention(ref_cache, *args, window=window)
        assert np.all(np.isfinite(got))
        worst = max(worst, float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
    return worst


@pytest.mark.parametrize("type", sorted(KV_CACHE_TYPES.values()), ids=lambda t: t.name)
@pytest.mark.parametrize("head_dim", [32, 48, 64, 80, 96, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7])
def test_prefill_then_decode(isa, type, head_dim, group):
    """A 45-token prompt (tiles of 32 keys and a remainder), a 3-token continuation, then decode
    steps at positions 48 and 49."""
    if type == GGMLType.Q8_0 and head_dim % 32:
        pytest.skip("a Q8_0 cache holds whole blocks of 32 values")
    batches = (Batch.of(0, 45), Batch.of(45, 3), Batch.of(48, 1), Batch.of(49, 1))
    error = run(2, type, head_dim, 2 * group, 2, batches)
    assert error < TOLERANCE, f"{isa} {type.name} hd={head_dim} group={group}: error {error:.3g}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(64, 9, 3), (128, 8, 2), (80, 8, 1)])
@pytest.mark.parametrize("window", [0, 333])
def test_long_decode_split_into_shares(isa, threads, head_dim, n_heads, n_kv, window):
    """Decode after 1,100 keys: shares of keys merged afterwards, a window that starts mid-tile,
    and a batch of two sequences' decode steps at different lengths."""
    batches = (Batch.of(0, 1100), Batch.of(1100, 1), Batch.of(0, 531, seq=1), Batch([1101, 531], [0, 1]))
    error = run(threads, GGMLType.F16, head_dim, n_heads, n_kv, batches, window=window, n_ctx=1110)
    assert error < TOLERANCE, f"{isa} threads={threads} hd={head_dim}: error {error:.3g}"


def test_one_kv_head_with_many_query_heads(isa):
    """Gemma-like: one kv head read by 8 query heads (two blocks of 4 rows), hd 256."""
    batches = (Batch.of(0, 70), Batch.of(70, 1), Batch.of(71, 1))
    error = run(2, GGMLType.F16, 256, 8, 1, batches)
    assert error < TOLERANCE, f"{isa}: error {error:.3g}"


def test_soft_capped_scores_match_float64(isa):
    """Soft-capped scores (cap tanh(s / cap), Gemma 2) through the vectorised tanh, read back as the
    probabilities themselves: key j's value is the one-hot vector e_j and its score s_j (query e_0,
    scale 1), so a row's output is softmax(cap tanh(s / cap)) over the keys it sees. Scores on both
    sides of the series/exponential seam (|s| / cap = 1/4), the clamp (10), zeros and extremes."""
    cap, hd = 2.0, 64
    marks = [0.0, 1e-30, 1e-6, 1e-3, 0.1, 0.2499, 0.25, 0.2501, 0.5, 1.0, 3.0, 9.99, 10.01, 50.0, 1e4]
    y = np.array(marks + [-m for m in marks[1:]], np.float64)
    y = np.concatenate([y, np.random.default_rng(20).uniform(-12, 12, hd - y.size)])
    scores = (cap * y).astype(np.float32)
    n = scores.size
    backend = CPUBackend(threads=1)
    cache = backend.new_kv_cache(CacheShape(1, 1, n + 1, 1, hd, GGMLType.F32))
    q = np.zeros((n, hd), np.float32)
    q[:, 0] = 1.0
    k = np.zeros((n, hd), np.float32)
    k[:, 0] = scores
    v = np.eye(n, hd, dtype=np.float32)
    got = backend.to_host(backend.attention(cache, 0, q, k, v, Batch.of(0, n), 1, 1, scale=1.0, softcap=cap))
    step = backend.to_host(backend.attention(cache, 0, q[:1], np.zeros((1, hd), np.float32),
                                             np.zeros((1, hd), np.float32), Batch.of(n, 1), 1, 1, scale=1.0,
                                             softcap=cap))
    capped = cap * np.tanh(scores.astype(np.float64) / cap)
    for row, (seen, out) in enumerate([(t + 1, got[t]) for t in range(n)] + [(n + 1, step[0])]):
        logits = np.append(capped, 0.0)[:seen]   # the decode step's own key: score 0, value 0
        want = np.exp(logits - logits.max())
        want /= want.sum()
        assert np.allclose(out[:min(seen, n)], want[:n], rtol=1e-5, atol=0), f"{isa}, row {row}"
