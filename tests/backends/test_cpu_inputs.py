"""Bad arguments to the CPU backend raise BackendError before native code sees them."""
import numpy as np
import pytest

from zephyr.backend import Batch, CacheShape, Weight
from zephyr.errors import BackendError
from zephyr.quants import GGMLType
from zephyr_backends.cpu import _ops
from zephyr_backends.cpu.backend import CPUBackend


@pytest.fixture(scope="module")
def cpu():
    return CPUBackend(threads=2)


@pytest.fixture
def matrix(cpu, make_weight):
    return cpu.load_weight(make_weight(GGMLType.Q4_0, (4, 64)))


def f32(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("x, message", [
    (np.zeros((1, 64)), "float32"),
    (f32(1, 128)[:, ::2], "contiguous"),
    (f32(64), "2-D"),
    ([[0.0] * 64], "numpy array"),
    (f32(1, 32), "width"),
])
def test_matmul_rejects_bad_activations(cpu, matrix, x, message):
    with pytest.raises(BackendError, match=message):
        cpu.matmul(x, matrix)


def test_matmul_rejects_raw_arrays_as_weights(cpu):
    with pytest.raises(BackendError, match="load_weight"):
        cpu.matmul(f32(1, 64), f32(4, 64))


@pytest.mark.parametrize("change, message", [
    (dict(shape=(4, 48)), "blocks"),                              # k not a multiple of 32
    (dict(shape=(5, 64)), "bytes"),                               # more rows than data
    (dict(data=np.zeros(10, np.uint8)), "bytes"),                 # truncated data
    (dict(data=np.zeros(36, np.float32)), "uint8"),
    (dict(type=GGMLType.IQ4_NL), "not supported"),
    (dict(shape=(2, 2, 64)), "vector or matrix"),
])
def test_load_weight_rejects_bad_weights(cpu, make_weight, change, message):
    weight = make_weight(GGMLType.Q4_0, (4, 64))
    fields = dict(name="w", type=weight.type, shape=weight.shape, data=weight.data) | change
    with pytest.raises(BackendError, match=message):
        cpu.load_weight(Weight(**fields))


@pytest.mark.parametrize("ids", [np.array([4]), np.array([-1]), np.array([0.0]), np.array([[0]])])
def test_embed_rejects_bad_ids(cpu, matrix, ids):
    with pytest.raises(BackendError, match="token ids"):
        cpu.embed(matrix, ids)


def test_rms_norm_rejects_wrong_weight_length(cpu):
    with pytest.raises(BackendError, match="rms_norm: the vector weight has 63 values, expected 64"):
        cpu.rms_norm(f32(2, 64), f32(63), 1e-5)


@pytest.mark.parametrize("args, message", [
    (([0, 1], 64, 63, 1e4, False), "even"),
    (([0, 1], 64, 66, 1e4, False), "even"),
    (([0, 1], 48, 16, 1e4, False), "multiple of head_dim"),
    (([-1, 1], 64, 64, 1e4, False), "positions must lie"),
    (([0], 64, 64, 1e4, False), "1 positions for 2 rows"),
    (([[0, 1]], 64, 64, 1e4, False), "1-D integer"),
])
def test_rope_rejects_bad_geometry(cpu, args, message):
    with pytest.raises(BackendError, match=message):
        cpu.rope(f32(2, 128), *args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch=Batch.of(7, 2)), "does not fit"),      # positions 7, 8 of 8
    (dict(batch=Batch.of(0, 2, seq=3)), "sequence 3"),
    (dict(batch=Batch.of(0, 3)), "rows"),
    (dict(batch=[0, 1]), "Batch"),
    (dict(layer=2), "layer"),
    (dict(n_kv_heads=4), "kv heads"),
    (dict(n_heads=3), "kv heads"),
    (dict(k=f32(3, 32)), "rows"),
    (dict(v=f32(2, 16)), "width"),
    (dict(q=np.zeros((2, 64))), "float32"),
    (dict(window=-1), "window"),
    (dict(cache=object()), "new_kv_cache"),
])
def test_attention_rejects_bad_arguments(cpu, kwargs, message):
    args = dict(cache=cpu.new_kv_cache(CacheShape(2, 3, 8, 2, 16)), layer=0, q=f32(2, 64), k=f32(2, 32),
                v=f32(2, 32), batch=Batch.of(0, 2), n_heads=4, n_kv_heads=2) | kwargs
    with pytest.raises(BackendError, match=message):
        cpu.attention(**args)


def test_batch_rejects_bad_places():
    with pytest.raises(BackendError, match="positions must lie"):
        Batch([-1], [0])
    with pytest.raises(BackendError, match="a sequence for every position"):
        Batch([0, 1], [0])


@pytest.mark.parametrize("shape, message", [
    (dict(n_ctx=0), "n_ctx must be an integer >= 1"),
    (dict(type=GGMLType.Q4_0), "KV cache type"),
    (dict(type=GGMLType.Q8_0, head_dim=48), "multiple of 32"),
])
def test_cache_shape_rejects_what_no_backend_can_hold(shape, message):
    with pytest.raises(BackendError, match=message):
        CacheShape(**(dict(n_layers=1, n_seqs=1, n_ctx=8, n_kv_heads=2, head_dim=64) | shape))


@pytest.mark.parametrize("op", ["swiglu", "add"])
def test_elementwise_ops_reject_mismatched_shapes(cpu, op):
    with pytest.raises(BackendError, match="shapes"):
        getattr(cpu, op)(f32(2, 8), f32(2, 9))
    with pytest.raises(BackendError, match="float32"):
        getattr(cpu, op)(f32(2, 8), np.zeros((2, 8), np.float16))


def test_native_layer_refuses_short_buffers():
    """A wrapper bug must surface as an exception, not as an out-of-bounds read."""
    with pytest.raises(ValueError, match="smaller"):
        _ops.matmul(f32(1, 32), np.zeros(17, np.uint8), int(GGMLType.Q4_0), 1, f32(1, 1), 1)
    with pytest.raises(ValueError, match="out of range"):
        _ops.embed(np.zeros(18, np.uint8), int(GGMLType.Q4_0), 1, np.array([1], np.int32), f32(1, 32), 1)
    cache = np.zeros((2, 1, 1, 1, 64), np.uint8)   # one f32 row of 16 values: position 0 only
    with pytest.raises(ValueError, match="outside the cache"):
        _ops.attention(f32(2, 16), f32(2, 16), f32(2, 16), cache, int(GGMLType.F32), np.arange(2, dtype=np.int32),
                       np.zeros(2, np.int32), 1, 0, 0.25, 0.0, f32(2, 16), 1)
    with pytest.raises(ValueError, match="head_dim values"):
        _ops.attention(f32(1, 32), f32(1, 32), f32(1, 32), cache, int(GGMLType.F32), np.zeros(1, np.int32),
                       np.zeros(1, np.int32), 1, 0, 0.25, 0.0, f32(1, 32), 1)


def test_native_layer_refuses_short_weights():
    """The fused layer's native constructor checks every buffer against the shapes it is given."""
    d, f, heads, hd = 64, 128, 2, 32
    norm = np.ones(d, np.float32)
    cache = np.zeros((2, 1, 1, 8, hd * 4), np.uint8)   # f32 keys and values of one sequence, 8 positions

    def matrix(rows, cols, type=GGMLType.Q4_0):
        return np.zeros(rows * _ops.row_bytes(int(type), cols), np.uint8), int(type), rows

    ok = dict(wq=matrix(heads * hd, d), wk=matrix(hd, d), wv=matrix(hd, d), wo=matrix(d, heads * hd),
              w_gate=matrix(f, d), w_up=matrix(f, d), w_down=matrix(d, f))
    vectors = dict(attn_norm=norm, ffn_norm=norm)
    scaling = (1.0, 0.0, 1.0, 0.0, 0.0)

    def layer(cache_type=GGMLType.F32, vectors=vectors, **change):
        return _ops.Layer(ok | change, vectors, heads, 1, hd, hd, 1e4, False, scaling, 1e-5, 0, hd ** -0.5, 0.0,
                          False, cache, int(cache_type))

    layer()
    with pytest.raises(ValueError, match="w_down: weight buffer is smaller"):
        layer(w_down=(matrix(d, f // 2)[0], int(GGMLType.Q4_0), d))
    with pytest.raises(ValueError, match="wq: cannot multiply"):
        layer(wq=(ok["wq"][0], int(GGMLType.IQ2_XXS), heads * hd))
    with pytest.raises(ValueError, match="q_bias: wrong length"):
        layer(vectors=vectors | dict(q_bias=np.zeros(hd, np.float32)))
    with pytest.raises(ValueError, match="head_dim values"):
        layer(cache_type=GGMLType.F16)
