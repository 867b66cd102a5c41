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
from zephyr.backend import LayerParams, Weight
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
    """Layer i adds i + 1 and the position to x; launches are recorded while capturing."""

    def __init__(self):
        self.cp = types.SimpleNamespace(empty=lambda shape, dtype=None: np.zeros(shape), float32=np.float32,
                                        copyto=np.copyto)
        self.stream = _Stream()
        self.position = [0]
        self.eager_layers = 0
        self.graphs = DecodeGraphs(self)

    def _set_position(self, pos):
        self.position[0] = pos

    def scratch(self, n, call):
        pass

    def layer_decode(self, x, out, call):
        def run():
            out[...] = x + call.layer + 1 + self.position[0]
        if self.stream.captured is not None:
            self.stream.captured.append(run)
        else:
            run()

    def step(self, calls, x, pos):
        """What LlamaModel.forward does with a run of layers on this backend."""
        for call in calls:
            out = self.graphs.follow(x, call.weights, call.params, call.cache, call.layer, pos)
            if out is None:
                out = self.graphs.run(x, call, pos)
            if out is None:
                self.eager_layers += 1
                self._set_position(pos)
                out = np.zeros_like(x)
                self.layer_decode(x, out, call)
                self.graphs.record(call, out, pos)
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


def test_decode_graph_not_replayed_for_another_input():
    b, calls = _LayerBackend(), _calls(2)
    b.step(calls, np.ones((1, 4)), 0)
    b.step(calls, np.ones((1, 4)), 1)
    x = np.full((1, 4), 5.0)
    out = b.step(calls[:1], x, 2)   # a run of one layer only ...
    np.testing.assert_array_equal(out, x + 1 + 2)
    np.testing.assert_array_equal(b.step(calls[1:], out + 1, 2), out + 1 + 2 + 2)   # ... then another input


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


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 16), (20, 2, 64), (4, 4, 128)])
@pytest.mark.parametrize("window", [0, 7])
def test_attention_with_decode_splits(cuda, reference, heads, kv_heads, head_dim, window):
    """A cache long enough for flash-decoding splits; groups above 8 heads are cut in pieces."""
    rng = np.random.default_rng(heads + window)
    caches = {b: b.new_kv_cache(1, 1024, kv_heads, head_dim) for b in (cuda, reference)}
    assert caches[cuda].splits > 1
    start = 0
    for n in (20, 9, 1, 3, 1):
        q = rng.standard_normal((n, heads * head_dim)).astype(np.float32)
        k = rng.standard_normal((n, kv_heads * head_dim)).astype(np.float32)
        v = rng.standard_normal((n, kv_heads * head_dim)).astype(np.float32)
        args = (0, q, k, v, start, heads, kv_heads)
        got = run(cuda, "attention", caches[cuda], *args, window=window)
        assert relative_error(got, reference.attention(caches[reference], *args, window=window)) < TOLERANCE
        start += n


def test_head_size_limits_are_reported(cuda):
    from zephyr.errors import BackendError
    with pytest.raises(BackendError, match="head size"):
        cuda.new_kv_cache(1, 8, 1, 258)


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


def _placed_model(path, gpu, gpu_layers, graphs=True):
    """LlamaModel with the last gpu_layers layers (and the head, with all) on `gpu`, the rest on the reference."""
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
    return LlamaModel(file, config, Placement(ref, layers, gpu if on_gpu == config.n_layers else ref), 64)


def greedy(model, chunk, steps=5):
    """Logits after the prompt (in chunks) and after each greedy token; the tokens."""
    pos, logits = 0, None
    for i in range(0, len(PROMPT), chunk):
        logits = model.forward(np.array(PROMPT[i:i + chunk]), pos)
        pos += len(PROMPT[i:i + chunk])
    all_logits, tokens = [logits], []
    for _ in range(steps):
        tokens.append(int(np.argmax(all_logits[-1])))
        all_logits.append(model.forward(np.array(tokens[-1:]), pos))
        pos += 1
    return all_logits, tokens


@pytest.mark.parametrize("gpu_layers", [-1, 1])
def test_model_matches_the_reference_and_graphs_replay(make_cuda, tiny_model, gpu_layers):
    ref_logits, ref_tokens = greedy(_placed_model(tiny_model, plugins.get_backend_class("reference")(), 0), 5)
    backend = make_cuda()
    logits, tokens = greedy(_placed_model(tiny_model, backend, gpu_layers), 5)
    assert tokens == ref_tokens
    assert max(relative_error(a, b) for a, b in zip(logits, ref_logits)) < MODEL_TOLERANCE
    assert backend.graphs.replays == 4   # every decode step after the first


def test_graph_replay_equals_eager_decode(make_cuda, tiny_model):
    eager_logits, eager_tokens = greedy(_placed_model(tiny_model, make_cuda(), -1, graphs=False), 12)
    backend = make_cuda()
    graph_logits, graph_tokens = greedy(_placed_model(tiny_model, backend, -1, graphs=True), 12)
    assert backend.graphs.replays == 4 and graph_tokens == eager_tokens
    for a, b in zip(graph_logits, eager_logits):
        np.testing.assert_array_equal(a, b)


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
