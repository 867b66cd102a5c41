"""The CUDA backend (backends/cuda).

Three tiers:
- everywhere: availability reasons, registration, packaging, the weight layout, the decode-graph
  bookkeeping, and a compile check of every kernel file with nvcc (sm_90 machine code, sm_80 PTX)
  and with NVRTC;
- with g++ on x86-64: the kernels and the whole backend on the CPU emulator (emulation.py), against the
  reference backend;
- with a CUDA GPU: the same checks on the device, plus generation against the CPU backend.
The conformance suite (test_conformance.py) also runs every op on the GPU when one is usable.
"""
import ast
import os
import shutil
import subprocess
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from zephyr.testing.blocks import random_blocks
from zephyr import AutoModelForCausalLM, plugins, quants
from zephyr.backend import Backend, Batch, CacheShape, LayerParams, LayerWeights, Weight
from zephyr.errors import BackendError
from zephyr.quants import GGMLType, SUPPORTED_TYPES, TYPE_INFO
from zephyr.testing.synthetic import write_llama_model
from zephyr_backends.cuda import emulation, layout, runtime
from zephyr_backends.cuda.backend import CudaBackend
from zephyr_backends.cuda.graphs import DecodeGraphs, LayerCall

REPO = Path(__file__).resolve().parents[2]
FLOAT_TYPES = {GGMLType.F32, GGMLType.F16, GGMLType.BF16}
TYPES = sorted(SUPPORTED_TYPES)
TOLERANCE = 1e-4   # as test_conformance.py: only float summation order differs from the reference


def relative_error(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


# -- availability ----------------------------------------------------------------------------

def fake_cupy(driver=13000, runtime_version=13000, devices=1, capability="90", count_error=None):
    def device_count():
        if count_error:
            raise RuntimeError(count_error)
        return devices
    api = types.SimpleNamespace(driverGetVersion=lambda: driver, runtimeGetVersion=lambda: runtime_version,
                                getDeviceCount=device_count)
    device = types.SimpleNamespace(compute_capability=capability)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=api, Device=lambda i=0: device))


@pytest.mark.parametrize("cupy, reason", [
    (None, "CuPy is not installed (pip install 'zephyr[cuda12]' or 'zephyr[cuda13]')"),
    (fake_cupy(driver=0), "no NVIDIA driver found"),
    (fake_cupy(driver=12080, runtime_version=13000), "the NVIDIA driver supports CUDA 12.8, older than the CUDA 13.0"),
    (fake_cupy(devices=0), "no CUDA device found"),
    (fake_cupy(count_error="cudaErrorNoDevice"), "no usable CUDA device (cudaErrorNoDevice)"),
    (fake_cupy(capability="52"), "compute capability 5.2"),
], ids=["no-cupy", "no-driver", "old-driver", "no-device", "device-error", "old-gpu"])
def test_availability_reasons(monkeypatch, cupy, reason):
    monkeypatch.setattr(runtime, "import_cupy", lambda: cupy)
    usable = runtime.availability()
    assert not usable and reason in usable.reason


def test_availability_with_a_usable_device(monkeypatch):
    monkeypatch.setattr(runtime, "import_cupy", lambda: fake_cupy(driver=13010, runtime_version=13000))
    assert runtime.availability()


def test_registered_as_the_gpu_plugin():
    cls = plugins.backend_classes()["cuda"]
    assert cls is CudaBackend and cls.device == "gpu" and cls.score == 100
    assert set(cls.supported_types) == set(SUPPORTED_TYPES)
    assert cls.kv_cache_types == {GGMLType.F16, GGMLType.F32} and cls.options == ()
    listed = {name: (usable, reason) for name, _score, usable, reason in plugins.describe_backends()}
    usable, reason = listed["cuda"]
    assert usable == bool(CudaBackend.availability()) and (usable or reason)


# -- packaging and the compile check ------------------------------------------------------------

def test_kernel_sources_are_package_data():
    """setup.py ships every file of backends/cuda/kernels (the backend compiles them at run time)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    patterns = None
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "package_data":
            patterns = ast.literal_eval(node.value).get("zephyr_backends.cuda")
        if isinstance(node, ast.keyword) and node.arg == "packages":
            assert "zephyr_backends.cuda" in ast.literal_eval(node.value)
    assert patterns, "setup.py's package_data has no entry for zephyr_backends.cuda"
    kernel_dir = REPO / "backends" / "cuda" / "kernels"
    shipped = {p for pattern in patterns for p in (REPO / "backends" / "cuda").glob(pattern)}
    assert set(kernel_dir.iterdir()) <= shipped
    assert {p.stem for p in kernel_dir.glob("*.cu")} == set(runtime.KERNEL_FILES)
    assert runtime.KERNEL_DIR.is_dir()   # where the installed package looks


def test_kernel_source_inlines_local_headers_once():
    source = runtime.kernel_source("matvec")
    assert '#include "' not in source
    assert source.count("struct Planes {") == 1 and source.count("struct FormatQ4_K {") == 1


def _nvcc_compile(path, arch, output):
    result = subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", output, "-o", os.devnull, str(path)],
                            capture_output=True, text=True)
    return path.name, arch, result.returncode, result.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_compiles_every_kernel_file():
    """Every .cu file builds to Hopper machine code (sm_90, through ptxas) and to Ampere PTX (sm_80)
    (machine code for both would double the slowest file's ~30 s)."""
    jobs = [(path, arch, output)
            for path in sorted(runtime.KERNEL_DIR.glob("*.cu"), key=lambda p: p.name != "matvec.cu")
            for arch, output in (("sm_90", "-cubin"), ("sm_80", "-ptx"))]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda job: _nvcc_compile(*job), jobs))
    failures = [f"{name} ({arch}):\n{err}" for name, arch, code, err in results if code]
    assert not failures, "\n".join(failures)


def _nvrtc():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.skipif(_nvrtc() is None, reason="CuPy with an NVRTC library is not installed")
@pytest.mark.parametrize("file", runtime.KERNEL_FILES)
def test_nvrtc_compiles_every_kernel_file(file):
    """What the backend does at run time: NVRTC on the inlined source, with the options CuPy adds."""
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(runtime.kernel_source(file), f"{file}.cu", [], [])
    try:
        nvrtc.compileProgram(program, list(runtime.NVRTC_OPTIONS) + [
            "-ftz=true", "--device-as-default-execution-space", "-arch=compute_90"])
    except Exception as exc:
        pytest.fail(f"{file}.cu: {exc}\n{nvrtc.getProgramLog(program)}")
    finally:
        nvrtc.destroyProgram(program)


# -- the weight layout ----------------------------------------------------------------------------

@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_layout_keeps_every_bit(type):
    info = TYPE_INFO[type]
    rows, cols = 3, (37 if info.block_size == 1 else 2 * info.block_size)
    raw = random_blocks(type, (rows, cols), np.random.default_rng(0))
    buffer, planes = layout.pack(np, raw, type, rows, cols)
    assert buffer.size % layout.ALIGN == 0
    assert all((p.ctypes.data - buffer.ctypes.data) % layout.ALIGN == 0 for p in planes)   # device buffers are 256-aligned
    np.testing.assert_array_equal(layout.unpack(np, planes, type, rows, cols), raw)
    if type in layout.PLANES:   # the planes tile the block exactly
        fields = sorted(layout.PLANES[type])
        assert fields[0][0] == 0 and sum(length for _, length in fields) == info.type_size
        assert all(a + la == b for (a, la), (b, _) in zip(fields, fields[1:]))


# -- decode-graph bookkeeping, on a stand-in backend ------------------------------------------------

class _Graph:
    def __init__(self, ops):
        self.ops = ops

    def launch(self, stream=None):
        for op in self.ops:
            op()


class _Stream:
    captured = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self):
        self.captured = []

    def end_capture(self):
        graph, self.captured = _Graph(self.captured), None
        return graph


class _LayerBackend:
    """Layer i adds i + 1, the token's position and 100 x its sequence to x; launches are recorded
    while capturing."""

    def __init__(self):
        self.cp = types.SimpleNamespace(empty=lambda shape, dtype=None: np.zeros(shape), float32=np.float32,
                                        copyto=np.copyto)
        self.stream = _Stream()
        self.device_batch = np.zeros((2, 8))   # positions, sequences
        self.eager_layers = 0
        self.graphs = DecodeGraphs(self)

    def _set_batch(self, batch):
        self.device_batch[:, :len(batch)] = batch.positions, batch.seqs

    def scratch(self, n, call):
        pass

    def layer_decode(self, x, out, call):
        def run():
            n = x.shape[0]
            out[...] = x + call.layer + 1 + (self.device_batch[0, :n] + 100 * self.device_batch[1, :n])[:, None]
        if self.stream.captured is not None:
            self.stream.captured.append(run)
        else:
            run()

    def step(self, calls, x, pos, seq=0):
        """What LlamaModel.forward does with a run of layers on this backend; pos, seq: ints or lists."""
        batch = Batch(np.atleast_1d(pos), np.broadcast_to(seq, np.atleast_1d(pos).shape))
        for call in calls:
            out = self.graphs.follow(x, call.weights, call.params, call.cache, call.layer, batch)
            if out is None:
                out = self.graphs.run(x, call, batch)
            if out is None:
                self.eager_layers += 1
                self._set_batch(batch)
                out = np.zeros_like(x)
                self.layer_decode(x, out, call)
                self.graphs.record(call, out, batch)
            x = out
        return x


def _calls(n, weights=None):
    weights = weights or [types.SimpleNamespace(wq=types.SimpleNamespace(cols=4)) for _ in range(n)]
    params, cache = LayerParams(4, 2, 2, 2, 10000.0, False, 1e-5, 0), object()
    return [LayerCall(weights[i], params, cache, i) for i in range(n)]


def test_decode_graph_is_captured_on_the_second_step_and_replayed():
    b, calls = _LayerBackend(), _calls(3)
    x = np.ones((1, 4))
    for pos in range(5):
        out = b.step(calls, x, pos)
        np.testing.assert_array_equal(out, x + 6 + 3 * pos)   # layers add 1 + 2 + 3 and the position 3 times
    assert b.eager_layers == 3 and b.graphs.replays == 4


def test_decode_graph_survives_prompts_between_steps():
    b, calls = _LayerBackend(), _calls(2)
    x = np.ones((1, 4))
    b.step(calls, x, 0)
    b.step(calls, x, 1)
    b.step(calls, x, 7)   # a new prompt moved the position: the same graph serves it
    np.testing.assert_array_equal(b.step(calls, x, 8), x + 3 + 2 * 8)
    assert b.eager_layers == 2 and b.graphs.replays == 3


def test_decode_graph_left_half_way_falls_back_and_recaptures():
    b, calls = _LayerBackend(), _calls(3)
    x = np.ones((1, 4))
    b.step(calls, x, 0)
    b.step(calls, x, 1)
    other = _calls(3)   # other weights for layers 1 and 2: the replayed outputs must not be used
    mixed = [calls[0], other[1], other[2]]
    np.testing.assert_array_equal(b.step(mixed, x, 2), x + 6 + 3 * 2)
    assert b.eager_layers == 3 + 2
    b.step(mixed, x, 3)   # records the new run in full
    np.testing.assert_array_equal(b.step(mixed, x, 4), x + 6 + 3 * 4)
    assert b.graphs.replays == 3


def test_one_decode_graph_serves_every_sequence():
    b, calls = _LayerBackend(), _calls(2)
    x = np.ones((1, 4))
    b.step(calls, x, 0, seq=0)
    for pos, seq in ((0, 1), (1, 0), (1, 1), (5, 3)):
        np.testing.assert_array_equal(b.step(calls, x, pos, seq), x + 3 + 2 * (pos + 100 * seq))
    assert b.eager_layers == 2 and b.graphs.replays == 4


def test_decode_graphs_are_kept_per_batch_size():
    """Four sequences decoding together and one alone take turns: each size has its own graph."""
    b, calls = _LayerBackend(), _calls(2)
    one, four = np.ones((1, 4)), np.ones((4, 4))
    for step in range(3):
        got = b.step(calls, four, [step] * 4, [0, 1, 2, 3])
        np.testing.assert_array_equal(got, four + 3 + 2 * (step + 100 * np.arange(4.0))[:, None])
        np.testing.assert_array_equal(b.step(calls, one, step, 5), one + 3 + 2 * (step + 500))
    assert b.eager_layers == 4 and b.graphs.replays == 4
    assert b.graphs.graph(1) is not None and b.graphs.graph(4) is not None and b.graphs.graph(2) is None


def test_decode_graph_not_replayed_for_another_input():
    b, calls = _LayerBackend(), _calls(2)
    b.step(calls, np.ones((1, 4)), 0)
    b.step(calls, np.ones((1, 4)), 1)
    x = np.full((1, 4), 5.0)
    out = b.step(calls[:1], x, 2)   # a run of one layer only ...
    np.testing.assert_array_equal(out, x + 1 + 2)
    np.testing.assert_array_equal(b.step(calls[1:], out + 1, 2), out + 1 + 2 + 2)   # ... then another input


def test_decode_graph_not_followed_for_another_batch():
    b, calls = _LayerBackend(), _calls(2)
    x = np.ones((1, 4))
    b.step(calls, x, 0)
    b.step(calls, x, 1)
    out = b.step(calls[:1], x, 2)   # layer 0 replayed at position 2 ...
    np.testing.assert_array_equal(b.step(calls[1:], out, 3), out + 2 + 3)   # ... layer 1 asked for position 3


# -- the backend on the emulator or the GPU -------------------------------------------------------

def _emulated():
    if not emulation.compiler_available():
        pytest.skip("the kernel emulator needs g++ on x86-64")
    return CudaBackend(gpu=emulation.EmulatedGPU())


def _gpu():
    usable = CudaBackend.availability()
    if not usable:
        pytest.skip(f"no usable CUDA GPU: {usable.reason}")
    return CudaBackend()


@pytest.fixture(scope="module", params=["emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def make_cuda(request):
    """A factory of CUDA backends: on the CPU emulator, or on the GPU."""
    make = _emulated if request.param == "emulated" else _gpu
    make()   # skips when unusable
    return make


@pytest.fixture(scope="module")
def cuda(make_cuda):
    return make_cuda()


@pytest.fixture(scope="module")
def reference():
    return plugins.get_backend_class("reference")()


def run(backend, op, *args, **kwargs):
    args = [backend.from_host(a) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a for a in args]
    return backend.to_host(getattr(backend, op)(*args, **kwargs))


def weight(type, shape, seed=0):
    return Weight("w", type, tuple(shape), random_blocks(type, shape, np.random.default_rng(seed)))


def width(type):
    block = TYPE_INFO[type].block_size
    return 13 * 32 + 7 if block == 1 else block * (3 if block == 256 else 5)


@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_decode_matmul_rounds_activations_as_the_reference(cuda, reference, type):
    k = width(type)
    w = weight(type, (33, k), seed=k)
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
        got = run(cuda, "matmul", x, cuda.load_weight(w))
        assert relative_error(got, reference.matmul(x, reference.load_weight(w))) < TOLERANCE


@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_prompt_matmul_is_an_f16_product(cuda, reference, type):
    """n > 8: x and the weight rounded to f16 (F32 weights: neither), products summed in f32."""
    k, n = width(type), 11
    w = weight(type, (37, k), seed=3)
    x = np.random.default_rng(5).standard_normal((n, k)).astype(np.float32)
    got = run(cuda, "matmul", x, cuda.load_weight(w))
    values = quants.dequantize(w.data, type, w.shape)
    if type != GGMLType.F32:
        x = x.astype(np.float16).astype(np.float32)
        values = values.astype(np.float16).astype(np.float32)
    want = (x.astype(np.float64) @ values.astype(np.float64).T).astype(np.float32)
    assert relative_error(got, want) < TOLERANCE


def test_prompt_matmul_adds_the_residual_in_chunks(cuda, reference, monkeypatch):
    """The prompt path dequantises bounded chunks of rows; several chunks and a residual add."""
    from zephyr_backends.cuda import backend as module
    monkeypatch.setattr(module, "DEQUANT_CHUNK_VALUES", 3 * 256)
    w = weight(GGMLType.Q4_K, (10, 256), seed=4)
    x = np.random.default_rng(6).standard_normal((12, 256)).astype(np.float32)
    resid = np.random.default_rng(7).standard_normal((12, 10)).astype(np.float32)
    y = cuda.from_host(np.zeros((12, 10), np.float32))
    with cuda.stream:
        cuda._gemm(cuda.from_host(x), cuda.load_weight(w), y, resid=cuda.from_host(resid))
    values = quants.dequantize(w.data, w.type, w.shape).astype(np.float16).astype(np.float64)
    want = resid + x.astype(np.float16).astype(np.float64) @ values.T
    assert relative_error(cuda.to_host(y), want) < TOLERANCE


@pytest.mark.parametrize("type", TYPES, ids=lambda t: t.name)
def test_embed(cuda, reference, type):
    w = weight(type, (33, width(type)), seed=1)
    ids = np.array([0, 32, 5, 5, 17], dtype=np.int32)
    got = run(cuda, "embed", cuda.load_weight(w), ids)
    assert relative_error(got, reference.embed(reference.load_weight(w), ids)) < TOLERANCE


CACHE_TYPES = sorted(CudaBackend.kv_cache_types)
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32   # as test_conformance.py


def caches(backends, type, n_layers=2, n_seqs=1, n_ctx=24, heads=(KV_HEADS, HEAD_DIM)):
    """One cache of this shape per backend."""
    shape = CacheShape(n_layers, n_seqs, n_ctx, *heads, type)
    return [b.new_kv_cache(shape) for b in backends]


def attend(cuda, reference, cache, ref_cache, batch, rng, window=0, layer=1, heads=(HEADS, KV_HEADS, HEAD_DIM),
           scale=1.0):
    """One batch through both backends' attention, compared."""
    n, (h, h_kv, hd) = len(batch), heads
    q = rng.standard_normal((n, h * hd)).astype(np.float32) * scale
    k = rng.standard_normal((n, h_kv * hd)).astype(np.float32) * scale
    v = rng.standard_normal((n, h_kv * hd)).astype(np.float32)
    args = (layer, q, k, v, batch, h, h_kv)
    got = run(cuda, "attention", cache, *args, window=window)
    assert relative_error(got, reference.attention(ref_cache, *args, window=window)) < TOLERANCE


@pytest.mark.parametrize("type", CACHE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 16), (20, 2, 64), (4, 4, 128)])
@pytest.mark.parametrize("window", [0, 7])
def test_attention_with_decode_splits(cuda, reference, heads, kv_heads, head_dim, window, type):
    """A cache long enough for flash-decoding splits; groups above 8 heads are cut in pieces;
    prompt chunks (n > 8, one split) and decode batches (n <= 8) take turns."""
    rng = np.random.default_rng(heads + window)
    cache, ref_cache = caches((cuda, reference), type, n_ctx=1024, heads=(kv_heads, head_dim))
    assert cache.splits > 1
    start = 0
    for n in (20, 9, 1, 3, 1):
        attend(cuda, reference, cache, ref_cache, Batch.of(start, n), rng, window, heads=(heads, kv_heads, head_dim))
        start += n


@pytest.mark.parametrize("type", CACHE_TYPES, ids=lambda t: t.name)
def test_attention_over_several_sequences(cuda, reference, type):
    """Sequences fill independently; decode batches (n <= 8) and a prompt batch (n > 8) mix them."""
    rng = np.random.default_rng(9)
    cache, ref_cache = caches((cuda, reference), type, n_seqs=3)
    mixed_prompt = Batch(np.r_[7:13, 6, 2, 3], np.r_[[2] * 6, 0, 1, 1])
    for batch in (Batch.of(0, 5, seq=2), Batch.of(0, 3, seq=0), Batch([5, 3, 4, 0], [2, 0, 0, 1]),
                  Batch([6, 5, 1], [2, 0, 1]), mixed_prompt, Batch([13, 4, 7], [2, 1, 0])):
        attend(cuda, reference, cache, ref_cache, batch, rng, window=4)


@pytest.mark.parametrize("window", [0, 700])
def test_attention_at_a_long_context(cuda, reference, window):
    """Decode and a prompt chunk after 1,037 keys (written with write_sequence: a 1,037-token
    prefill takes minutes on the emulator): decode splits and 32-key steps meet their seams."""
    rng = np.random.default_rng(10)
    cache, ref_cache = caches((cuda, reference), GGMLType.F16, n_layers=1, n_seqs=2, n_ctx=1100)
    history = rng.standard_normal((1, 2, KV_HEADS, 1037, HEAD_DIM)).astype(np.float16).view(np.uint8)
    for c in (cache, ref_cache):
        c.write_sequence(1, history)
    for batch in (Batch.of(1037, 1, seq=1), Batch.of(1038, 3, seq=1), Batch.of(1041, 9, seq=1)):
        attend(cuda, reference, cache, ref_cache, batch, rng, window, layer=0)


def test_attention_softmax_is_stable(cuda, reference):
    cache, ref_cache = caches((cuda, reference), GGMLType.F32, n_layers=1, n_ctx=4)
    attend(cuda, reference, cache, ref_cache, Batch.of(0, 3), np.random.default_rng(7), layer=0, scale=300)


@pytest.mark.parametrize("type", CACHE_TYPES, ids=lambda t: t.name)
def test_sequences_move_between_slots(cuda, reference, type):
    """copy_sequence and read/write_sequence carry a prefix; the bytes are the host cache's."""
    rng = np.random.default_rng(11)
    cache, ref_cache = caches((cuda, reference), type, n_seqs=3)
    attend(cuda, reference, cache, ref_cache, Batch.of(0, 7, seq=0), rng)
    np.testing.assert_array_equal(cache.read_sequence(0, 7), ref_cache.read_sequence(0, 7))
    for c in (cache, ref_cache):
        c.copy_sequence(0, 1, 7)
        c.write_sequence(2, c.read_sequence(0, 5))
    attend(cuda, reference, cache, ref_cache, Batch([7, 7, 5], [0, 1, 2]), rng)
    np.testing.assert_array_equal(cache.read_sequence(1, 8), ref_cache.read_sequence(1, 8))
    np.testing.assert_array_equal(cache.read_sequence(2, 6), ref_cache.read_sequence(2, 6))
    with pytest.raises(BackendError, match="sequence 3"):
        cache.copy_sequence(0, 3, 1)
    with pytest.raises(BackendError, match="write_sequence takes"):
        cache.write_sequence(0, cache.read_sequence(0, 2)[:, :1])


@pytest.mark.parametrize("start", [0, 37])
@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
def test_rope(cuda, reference, neox, start):
    x = np.random.default_rng(3).standard_normal((5, 3 * 64)).astype(np.float32)
    for positions in (np.arange(start, start + 5), np.array([start, 3, 900, 3, 0])):
        for n_rot in (64, 16):
            args = (positions.astype(np.int32), 64, n_rot, 10000.0, neox)
            assert relative_error(run(cuda, "rope", x, *args), reference.rope(x, *args)) < TOLERANCE


def test_cache_types_and_head_sizes_are_checked(cuda):
    with pytest.raises(BackendError, match="cannot keep a Q8_0 KV cache .*F16, F32"):
        cuda.new_kv_cache(CacheShape(1, 1, 8, 1, 64, GGMLType.Q8_0))
    with pytest.raises(BackendError, match="head size"):
        cuda.new_kv_cache(CacheShape(1, 1, 8, 1, 258))
    cache = cuda.new_kv_cache(CacheShape(1, 2, 4, KV_HEADS, HEAD_DIM))
    kv = cuda.from_host(np.zeros((2, KV_HEADS * HEAD_DIM), np.float32))
    q = cuda.from_host(np.zeros((2, HEADS * HEAD_DIM), np.float32))
    with pytest.raises(BackendError, match="cache"):
        cuda.attention(cache, 0, q, kv, kv, Batch.of(3, 2), HEADS, KV_HEADS)
    with pytest.raises(BackendError, match="sequence 2"):
        cuda.attention(cache, 0, q, kv, kv, Batch.of(0, 2, seq=2), HEADS, KV_HEADS)
    assert isinstance(cuda.memory_available(), int) and cuda.memory_available() > 0


# -- the whole block --------------------------------------------------------------------------------

D_MODEL, D_FFN = 256, 512


def block_weights(type):
    """A block of random weights (as test_conformance.py's), the matrices of `type`."""
    rng = np.random.default_rng(12)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = dict(wq=(q, D_MODEL), wk=(kv, D_MODEL), wv=(kv, D_MODEL), wo=(D_MODEL, q), w_gate=(D_FFN, D_MODEL),
                  w_up=(D_FFN, D_MODEL), w_down=(D_MODEL, D_FFN))
    matrices = {name: weight(type, shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    norms = {name: Weight(name, GGMLType.F32, (D_MODEL,), (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(
        np.float32).view(np.uint8)) for name in ("attn_norm", "ffn_norm")}
    return LayerWeights(**matrices, **norms)


def load_block(backend, weights):
    return LayerWeights(**{name: backend.load_weight(w) for name, w in weights.present().items()})


@pytest.mark.parametrize("type, cache_type", [(GGMLType.F32, GGMLType.F32), (GGMLType.Q8_0, GGMLType.F16),
                                              (GGMLType.Q4_K, GGMLType.F16)], ids=lambda t: t.name)
def test_decoder_layer_decode_path(cuda, reference, type, cache_type):
    """The fused block on decode batches (n <= 8, 8-bit activations) against the default composition
    on the reference: prompts of two sequences, then a batch of both."""
    weights = block_weights(type)
    p = LayerParams(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM // 2, 10000.0, True, 1e-5, 5)
    loaded = {b: load_block(b, weights) for b in (cuda, reference)}
    cache, ref_cache = caches((cuda, reference), cache_type, n_seqs=2)
    rng = np.random.default_rng(13)
    for batch in (Batch.of(0, 7), Batch.of(0, 2, seq=1), Batch([7, 2], [0, 1]), Batch([3, 8], [1, 0])):
        x = rng.standard_normal((len(batch), D_MODEL)).astype(np.float32)
        got = run(cuda, "decoder_layer", x, loaded[cuda], p, cache, 1, batch)
        want = Backend.decoder_layer(reference, x, loaded[reference], p, ref_cache, 1, batch)
        assert relative_error(got, want) < TOLERANCE


# The prompt path multiplies f16-rounded activations and weights (see test_prompt_matmul_is_an_f16_product):
# ~1e-3 from the 8-bit reference; a token attending over the wrong sequence or position is off by O(1).
PROMPT_LAYER_TOLERANCE = 1e-2


def test_decoder_layer_prompt_path_over_several_sequences(cuda, reference):
    weights = block_weights(GGMLType.Q8_0)
    p = LayerParams(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, 10000.0, False, 1e-5, 0)
    loaded = {b: load_block(b, weights) for b in (cuda, reference)}
    cache, ref_cache = caches((cuda, reference), GGMLType.F16, n_seqs=3)
    rng = np.random.default_rng(14)
    for batch in (Batch.of(0, 10, seq=2), Batch(np.r_[0:6, 10:14], np.r_[[0] * 6, [2] * 4])):
        x = rng.standard_normal((len(batch), D_MODEL)).astype(np.float32)
        got = run(cuda, "decoder_layer", x, loaded[cuda], p, cache, 1, batch)
        want = Backend.decoder_layer(reference, x, loaded[reference], p, ref_cache, 1, batch)
        assert relative_error(got, want) < PROMPT_LAYER_TOLERANCE
    assert not cache.read_sequence(1, 14).any()   # no stray writes into another sequence


# -- whole models ------------------------------------------------------------------------------------

PROMPT = [1, 41, 292, 96, 285, 142, 46, 105, 75, 272, 178, 391]
# Whole models against another backend: 8-bit activation rounding is discontinuous, so float summation
# order alone can move one activation across a rounding boundary (observed: one value of one token
# in one layer), which shifts logits of these random networks by up to ~1e-2. Ops are compared at
# TOLERANCE; models by their greedy tokens and this bound.
MODEL_TOLERANCE = 5e-2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "tiny-Q4_K_M.gguf"
    write_llama_model(path, "tiny", "Q4_K_M", vocab_size=400)
    return path


def _placed_model(path, gpu, gpu_layers, graphs=True, n_seqs=1, kv_cache_type=GGMLType.F16):
    """LlamaModel with the last gpu_layers layers (and the head, with all) on `gpu`, the rest on the
    reference; n_seqs sequences of 64 positions in its caches."""
    from zephyr import gguf
    from zephyr.config import ModelConfig
    from zephyr.model import LlamaModel
    from zephyr.placement import Placement
    file = gguf.read(path)
    config = ModelConfig.from_gguf(file)
    ref = plugins.get_backend_class("reference")()
    on_gpu = config.n_layers if gpu_layers < 0 else gpu_layers
    gpu.cuda_graphs = graphs
    layers = (ref,) * (config.n_layers - on_gpu) + (gpu,) * on_gpu
    head = gpu if on_gpu == config.n_layers else ref
    return LlamaModel(file, config, Placement(ref, layers, head), 64, n_seqs, kv_cache_type)


def prefill(model, prompt, chunk, seq=0):
    """The prompt into sequence `seq` in chunks; the last logits."""
    for i in range(0, len(prompt), chunk):
        logits = model.forward(np.array(prompt[i:i + chunk]), Batch.of(i, len(prompt[i:i + chunk]), seq))
    return logits


def greedy(model, chunk, steps=5):
    """Logits after the prompt (in chunks) and after each greedy token; the tokens."""
    all_logits, tokens = [prefill(model, PROMPT, chunk)], []
    for pos in range(len(PROMPT), len(PROMPT) + steps):
        tokens.append(int(np.argmax(all_logits[-1])))
        all_logits.append(model.forward(np.array(tokens[-1:]), Batch.of(pos, 1)))
    return all_logits, tokens


@pytest.mark.parametrize("gpu_layers", [-1, 1])
def test_model_matches_the_reference_and_graphs_replay(make_cuda, tiny_model, gpu_layers):
    ref_logits, ref_tokens = greedy(_placed_model(tiny_model, plugins.get_backend_class("reference")(), 0), 5)
    backend = make_cuda()
    logits, tokens = greedy(_placed_model(tiny_model, backend, gpu_layers), 5)
    assert tokens == ref_tokens
    assert max(relative_error(a, b) for a, b in zip(logits, ref_logits)) < MODEL_TOLERANCE
    # every decode-path step after the first of its size: the second 5-token chunk, 4 decode steps
    assert backend.graphs.replays == 5


# Four conversations of different lengths (prompts of up to 12 tokens: prompt and decode paths).
PROMPTS = [PROMPT, PROMPT[:9], PROMPT[3:][::-1], PROMPT[:5]]


def decode_alone(model, steps):
    """Each sequence's greedy tokens, one decode step of one sequence at a time (in turns), after
    its prompt; the logits of every step, by sequence."""
    logits = [[prefill(model, prompt, 12, seq)[0]] for seq, prompt in enumerate(PROMPTS)]
    for step in range(steps):
        for seq, prompt in enumerate(PROMPTS):
            token = int(np.argmax(logits[seq][-1]))
            logits[seq].append(model.forward(np.array([token]), Batch.of(len(prompt) + step, 1, seq))[0])
    return logits


def decode_together(model, steps):
    """The same, the four sequences decoding in one batch a step."""
    logits = [[prefill(model, prompt, 12, seq)[0]] for seq, prompt in enumerate(PROMPTS)]
    for step in range(steps):
        tokens = [int(np.argmax(row[-1])) for row in logits]
        batch = Batch([len(prompt) + step for prompt in PROMPTS], range(len(PROMPTS)))
        for row, out in zip(logits, model.forward(np.array(tokens), batch, rows=range(len(PROMPTS)))):
            row.append(out)
    return logits


@pytest.fixture(scope="module")
def alone(make_cuda, tiny_model):
    """decode_alone with CUDA graphs on, 2 steps; and how many steps the graphs served."""
    backend = make_cuda()
    return decode_alone(_placed_model(tiny_model, backend, -1, n_seqs=4), steps=2), backend.graphs.replays


def test_graph_replay_equals_eager_decode_across_sequences(make_cuda, tiny_model, alone):
    """One graph serves the decode steps of every sequence (after the first), bitwise as eager."""
    graphed, replays = alone
    eager = decode_alone(_placed_model(tiny_model, make_cuda(), -1, graphs=False, n_seqs=4), steps=2)
    np.testing.assert_array_equal(np.array(eager), np.array(graphed))
    assert replays == 2 * 4 - 1


def test_sequences_decoding_together_equal_each_alone(make_cuda, tiny_model, alone):
    """A batch of four sequences' decode tokens gives each the logits it gets decoding alone: the
    same kernels per token, bitwise (the 4-token graph replays the second step)."""
    backend = make_cuda()
    together = decode_together(_placed_model(tiny_model, backend, -1, n_seqs=4), steps=2)
    np.testing.assert_array_equal(np.array(alone[0]), np.array(together))
    assert backend.graphs.replays == 1


def test_f16_cache_is_close_to_f32(make_cuda, tmp_path):
    """Within 1e-2 of the f32 cache's logits on a model of f16 weights. (With quantised weights the
    8-bit activation rounding multiplies the difference: the reference backend itself moves a
    tiny Q4_K_M model's logits by 3e-2 between the two cache types.)"""
    path = tmp_path / "tiny-F16.gguf"
    write_llama_model(path, "tiny", "F16", vocab_size=400)
    f16_logits, f16_tokens = greedy(_placed_model(path, make_cuda(), -1), 12, steps=2)
    f32_logits, f32_tokens = greedy(_placed_model(path, make_cuda(), -1, kv_cache_type=GGMLType.F32), 12, steps=2)
    assert f16_tokens == f32_tokens
    assert 0 < max(relative_error(a, b) for a, b in zip(f16_logits, f32_logits)) < 1e-2


def test_a_cache_larger_than_the_free_device_memory_is_refused(make_cuda, tiny_model, monkeypatch):
    from zephyr.memory import InsufficientMemoryError
    backend = make_cuda()
    monkeypatch.setattr(backend.gpu, "memory_available", lambda: 100 << 10)   # the device's; the cache takes 128 KiB
    with pytest.raises(InsufficientMemoryError, match=r"KV cache on cuda \(2 x 64 positions, F16\)"):
        _placed_model(tiny_model, backend, -1, n_seqs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_layers", [-1, 1])
def test_gpu_generation_matches_the_cpu_backend(tiny_model, gpu_layers):
    """Through the public API: greedy tokens on the GPU (all layers, or a split) equal the CPU's."""
    _gpu()

    def generate(**kwargs):
        with AutoModelForCausalLM.from_pretrained(str(tiny_model), batch_size=5, **kwargs) as llm:
            llm.eval(PROMPT)
            logits, tokens = [llm.logits], []
            for _ in range(6):
                tokens.append(int(np.argmax(llm.logits)))
                llm.eval(tokens[-1:])
                logits.append(llm.logits)
            names = {b.name for b in llm.placement.layers}
            return logits, tokens, names

    cpu_logits, cpu_tokens, _ = generate(backend="cpu")
    gpu_logits, gpu_tokens, names = generate(backend="cpu", gpu_layers=gpu_layers)
    assert "cuda" in names
    assert gpu_tokens == cpu_tokens
    assert relative_error(gpu_logits[-1], cpu_logits[-1]) < MODEL_TOLERANCE
