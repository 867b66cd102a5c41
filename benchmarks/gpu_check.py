"""One command that checks and times the cuda backend on a GPU machine, within a time budget.

    python benchmarks/gpu_check.py [--budget SECONDS] [--prompt-tokens 512] [--decode-tokens 128]
                                   [--split-layers 16] [--no-7b] [--no-pytest] [--out FILE]
    python benchmarks/gpu_check.py --emulate    # stages 1-5 on the CPU kernel emulator, no GPU

Stages, in order of importance (each prints PASS / FAIL / SKIP lines and the run goes on after a
failure; a stage that would not fit the remaining budget is skipped):
 1. device and versions; CuPy availability as `zephyr backends` reports it
 2. compile every kernel file (NVRTC through CuPy; cached on disk afterwards)
 3. every op and weight type against the reference backend at small sizes (decode and prompt
    paths; attention over f16 and f32 caches, batches mixing sequences)
 4. a tiny synthetic model: greedy tokens against the reference; CUDA-graph replay against eager
 5. sequences: four decoding together in one batch against each decoding alone; the f16 cache's
    logits against the f32 cache's
 6. device-to-device copy bandwidth (the decode roofline)
 7. a Zephyr-7B-shaped Q4_K_M file (synthetic, written to a temporary directory, ~4.4 GB)
 8. that model on the GPU: load, prefill and decode tok/s, decode as % of the roofline, the graph
    replayed alone, eager decode, four sequences decoding in one batch
 9. the split run (the last --split-layers layers on the GPU, the rest on the CPU backend),
    whose logits are compared with the all-GPU run's
10. the pytest suites on the GPU (the conformance suite's cuda cases, test_cuda.py's gpu tests)

`--emulate` runs the correctness stages (1-5) on the kernel emulator of the tests
(backends/cuda/emulation.py) instead of CuPy: it checks this script on a machine without a GPU,
so a device session does not spend its minutes on a broken script (tests/test_gpu_check.py).

A Markdown table goes to stdout and, when $OUT is set (or --out is given), to $OUT/gpu_check.md.
Targets (H100, Zephyr-7B-shaped Q4_K_M): decode >= 300 tok/s, prefill >= 5000 tok/s.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TARGET_DECODE = 300.0
TARGET_PREFILL = 5000.0
BATCHED_SEQUENCES = 4   # the 7B model's batched decode
TOLERANCE = 1e-4
# Whole models: 8-bit activation rounding is discontinuous, so summation order alone can flip one
# rounded activation, moving the logits of a random network by up to ~1e-2 (see tests/backends/test_cuda.py).
MODEL_TOLERANCE = 5e-2
# Attention checks: (query heads, kv heads, head size, context) and the token counts of successive calls
ATTENTION_SHAPES = (((8, 2, 16, 24), (6, 5, 1, 1, 9, 1)),
                    ((32, 8, 128, 2048), (300, 40, 1, 3, 1)),
                    ((20, 2, 64, 1024), (300, 40, 1, 3, 1)))
TINY_DECODE_STEPS = 8
TINY_VOCAB = 32000   # Zephyr's: the output head is the tiny model's largest matrix
TINY_PROMPT = [1, 415, 293, 906, 285, 114, 461, 105, 754, 272, 178, 391]
# Four conversations of different lengths for the sequence checks (prompts of 5 to 12 tokens).
SEQUENCE_PROMPTS = [TINY_PROMPT, TINY_PROMPT[:9], TINY_PROMPT[3:][::-1], TINY_PROMPT[:5]]
SEQUENCE_STEPS = 3
# The f16 cache against the f32 cache, on a model of f16 weights (quantised weights' 8-bit
# activation rounding multiplies any difference; see tests/backends/test_cuda.py).
F16_CACHE_TOLERANCE = 1e-2


class Report:
    """Rows of (check, result, status) and the wall-clock budget."""

    def __init__(self, budget_s):
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.rows = []
        self.header = []

    def left(self):
        return self.deadline - time.perf_counter()

    def add(self, check, result, status):
        self.rows.append((check, result, status))
        print(f"{status:4}  {check}: {result}", flush=True)

    def stage(self, name, needs_s, function, *args):
        """Run one stage if `needs_s` seconds are left; a failure is reported, not raised."""
        if self.left() < needs_s:
            self.add(name, f"skipped: {self.left():.0f} s left of the budget, the stage needs ~{needs_s:.0f} s", "SKIP")
            return None
        print(f"\n== {name} ({self.left():.0f} s left)", flush=True)
        t = time.perf_counter()
        try:
            return function(self, *args)
        except Exception as exc:
            self.add(name, f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400], "FAIL")
            traceback.print_exc()
            return None
        finally:
            print(f"   ({time.perf_counter() - t:.1f} s)", flush=True)

    def markdown(self):
        lines = ["# zephyr GPU check", ""] + [f"- {line}" for line in self.header]
        lines += ["", f"Total time: {time.perf_counter() - self.start:.0f} s", "",
                  "| check | result | status |", "| --- | --- | --- |"]
        lines += [f"| {c} | {r} | {s} |" for c, r, s in self.rows]
        return "\n".join(lines) + "\n"


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


# -- 1-2: device, compile -----------------------------------------------------------------------

def cupy_backend():
    from zephyr_backends.cuda.backend import CudaBackend
    return CudaBackend()


def emulated_backend():
    from zephyr_backends.cuda import emulation
    from zephyr_backends.cuda.backend import CudaBackend
    return CudaBackend(gpu=emulation.EmulatedGPU())


def emulator_info(report):
    from zephyr_backends.cuda import emulation
    usable = emulation.compiler_available()
    report.add("cuda backend available", "on the CPU kernel emulator" if usable else "no: the emulator needs g++ on x86-64",
               "PASS" if usable else "FAIL")
    report.header += ["device: the CPU kernel emulator (--emulate): nothing here ran on a GPU",
                      f"python {sys.version.split()[0]}, numpy {np.__version__}"]


def device_info(report):
    from zephyr import plugins
    from zephyr_backends.cuda import runtime
    usable = runtime.availability()
    report.add("cuda backend available", usable.reason or "yes", "PASS" if usable else "FAIL")
    if not usable:
        raise RuntimeError(usable.reason)
    import cupy as cp
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    driver, built = cp.cuda.runtime.driverGetVersion(), cp.cuda.runtime.runtimeGetVersion()
    report.header += [f"device: {name}, compute capability {props['major']}.{props['minor']}, "
                      f"{props['multiProcessorCount']} SMs, {props['totalGlobalMem'] / 2**30:.0f} GiB",
                      f"CUDA driver {driver}, CuPy {cp.__version__} built for CUDA runtime {built}",
                      f"python {sys.version.split()[0]}, numpy {np.__version__}"]
    for line in report.header:
        print("   " + line)
    listed = {name: reason for name, _s, _u, reason in plugins.describe_backends()}
    report.add("zephyr backends lists cuda", "yes" if "cuda" in listed else "no", "PASS" if "cuda" in listed else "FAIL")


def compile_kernels(report, make_backend):
    t = time.perf_counter()
    make_backend().kernels.compile_all()
    report.add("compile all kernel files", f"{time.perf_counter() - t:.1f} s", "PASS")


# -- 3-4: correctness -----------------------------------------------------------------------------

def check_ops(report, make_backend):
    from zephyr import quants
    from zephyr.backend import Batch, CacheShape, Weight
    from zephyr.quants import GGMLType, SUPPORTED_TYPES, TYPE_INFO
    from zephyr.testing.blocks import random_blocks
    from zephyr_backends.reference.backend import ReferenceBackend
    gpu, ref = make_backend(), ReferenceBackend()

    def run(op, *args, **kwargs):
        args = [gpu.from_host(a) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a for a in args]
        return gpu.to_host(getattr(gpu, op)(*args, **kwargs))

    def make(type, shape, seed):
        return Weight("w", type, shape, random_blocks(type, shape, np.random.default_rng(seed)))

    def verdict(check, errors):
        worst = max(errors, key=lambda e: e[1])
        ok = all(e <= TOLERANCE for _, e in errors)
        report.add(check, f"{sum(e <= TOLERANCE for _, e in errors)}/{len(errors)} within {TOLERANCE:g}, "
                          f"worst {worst[1]:.2g} ({worst[0]})", "PASS" if ok else "FAIL")
        for name, e in errors:
            if e > TOLERANCE:
                print(f"      {name}: {e:.3g}")

    types = sorted(SUPPORTED_TYPES)
    decode, prompt, embed = [], [], []
    for t in types:
        block = TYPE_INFO[t].block_size
        for k in ((1, 13 * 32 + 7) if block == 1 else (block, block * (5 if block == 256 else 13))):
            for m in (7, 33):
                w = make(t, (m, k), m + k)
                gw, rw = gpu.load_weight(w), ref.load_weight(w)
                for n in (1, 5):
                    x = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
                    decode.append((f"{t.name} m={m} k={k} n={n}", relative_error(run("matmul", x, gw), ref.matmul(x, rw))))
                x = np.random.default_rng(11).standard_normal((11, k)).astype(np.float32)
                values = quants.dequantize(w.data, t, w.shape).astype(np.float64)
                if t != GGMLType.F32:   # the prompt path multiplies f16 values in f32
                    x = x.astype(np.float16)
                    values = values.astype(np.float16).astype(np.float64)
                got = run("matmul", np.asarray(x, np.float32), gw)
                prompt.append((f"{t.name} m={m} k={k} n=11", relative_error(got, x.astype(np.float64) @ values.T)))
        w = make(t, (33, 256 if block > 1 else 13 * 32 + 7), 1)
        ids = np.array([0, 32, 5, 5, 17], dtype=np.int32)
        embed.append((t.name, relative_error(run("embed", gpu.load_weight(w), ids), ref.embed(ref.load_weight(w), ids))))
    verdict("matmul, decode path (8-bit activations as the reference)", decode)
    verdict("matmul, prompt path (f16 cuBLAS)", prompt)
    verdict("embed", embed)

    rng = np.random.default_rng(2)
    others = []
    norm = make(GGMLType.F32, (419,), 2)
    x = rng.standard_normal((5, 419)).astype(np.float32)
    others.append(("rms_norm", relative_error(run("rms_norm", x, gpu.load_weight(norm), 1e-5),
                                              ref.rms_norm(x, ref.load_weight(norm), 1e-5))))
    for neox in (False, True):
        for n_rot in (64, 32):
            for positions in (np.arange(5), np.arange(4000, 4005), np.array([7, 3, 9000, 3, 0])):
                x = rng.standard_normal((5, 192)).astype(np.float32)
                args = (positions.astype(np.int32), 64, n_rot, 10000.0, neox)
                others.append((f"rope neox={neox} n_rot={n_rot} positions={positions.tolist()}",
                               relative_error(run("rope", x, *args), ref.rope(x, *args))))
    gate, up = rng.standard_normal((5, 333)).astype(np.float32) * 4, rng.standard_normal((5, 333)).astype(np.float32)
    gate[0, :4] = [-100.0, 100.0, -1e4, 1e4]
    others.append(("swiglu", relative_error(run("swiglu", gate, up), ref.swiglu(gate, up))))
    others.append(("add", relative_error(run("add", gate, up), ref.add(gate, up))))
    verdict("rms_norm, rope, swiglu, add", others)

    attention = []

    def attend(name, caches, batch, heads, kv, hd, window=0, layer=1, scale=1.0):
        n = len(batch)
        q = rng.standard_normal((n, heads * hd)).astype(np.float32) * scale
        k = rng.standard_normal((n, kv * hd)).astype(np.float32) * scale
        v = rng.standard_normal((n, kv * hd)).astype(np.float32)
        args = (layer, q, k, v, batch, heads, kv)
        got = run("attention", caches[0], *args, window=window)
        attention.append((name, relative_error(got, ref.attention(caches[1], *args, window=window))))

    for cache_type in (GGMLType.F16, GGMLType.F32):
        for (heads, kv, hd, n_ctx), calls in ATTENTION_SHAPES:
            for window in (0, 37):
                shape = CacheShape(2, 1, n_ctx, kv, hd, cache_type)
                caches = [b.new_kv_cache(shape) for b in (gpu, ref)]
                start = 0
                for n in calls:
                    attend(f"{cache_type.name} h={heads} kv={kv} hd={hd} window={window} n={n} start={start}",
                           caches, Batch.of(start, n), heads, kv, hd, window)
                    start += n
        caches = [b.new_kv_cache(CacheShape(2, 3, 24, 2, 32, cache_type)) for b in (gpu, ref)]
        for batch in (Batch.of(0, 5, seq=2), Batch.of(0, 3, seq=0), Batch([5, 3, 4, 0], [2, 0, 0, 1]),
                      Batch(np.r_[6:12, 5, 1, 2], np.r_[[2] * 6, 0, 1, 1]), Batch([12, 3, 6], [2, 1, 0])):
            attend(f"{cache_type.name} sequences {batch}", caches, batch, 8, 2, 32, window=4)
        caches = [b.new_kv_cache(CacheShape(1, 1, 4, 2, 16, cache_type)) for b in (gpu, ref)]
        attend(f"{cache_type.name} softmax at logits in the thousands", caches, Batch.of(0, 3), 8, 2, 16, layer=0,
               scale=300)
    verdict("attention (prompt, flash-decoding splits, windows, GQA, sequences, f16 and f32 caches)", attention)


class TinyModels:
    """Synthetic tiny models (written once into `workdir`) with every layer and the head on one backend."""

    def __init__(self, workdir):
        from zephyr_backends.reference.backend import ReferenceBackend
        self.workdir = workdir
        self.files = {}
        self.embedding = ReferenceBackend()   # the lookup stays on the CPU, as from_pretrained places it

    def model(self, backend, layout="Q4_K_M", graphs=True, n_seqs=1, kv_cache_type="f16"):
        from zephyr import gguf
        from zephyr.backend import KV_CACHE_TYPES
        from zephyr.config import ModelConfig
        from zephyr.model import LlamaModel
        from zephyr.placement import Placement
        from zephyr.testing.synthetic import write_llama_model
        if layout not in self.files:
            path = self.workdir / f"tiny-{layout}.gguf"
            write_llama_model(path, "tiny", layout, vocab_size=TINY_VOCAB)
            self.files[layout] = gguf.read(path)
        file = self.files[layout]
        config = ModelConfig.from_gguf(file)
        if hasattr(backend, "cuda_graphs"):
            backend.cuda_graphs = graphs
        placement = Placement(self.embedding, (backend,) * config.n_layers, backend)
        return LlamaModel(file, config, placement, 64, n_seqs, KV_CACHE_TYPES[kv_cache_type])

    def close(self):
        for file in self.files.values():
            file.close()


def prefill(model, prompt, chunk, seq=0):
    """The prompt into sequence `seq` in chunks of `chunk` tokens; the last logits [1, vocab]."""
    from zephyr.backend import Batch
    for i in range(0, len(prompt), chunk):
        logits = model.forward(np.array(prompt[i:i + chunk]), Batch.of(i, len(prompt[i:i + chunk]), seq))
    return logits


def greedy(model, chunk, steps=None):
    """Logits after TINY_PROMPT (in chunks) and after each of `steps` (default TINY_DECODE_STEPS)
    greedy tokens; the tokens."""
    from zephyr.backend import Batch
    out, tokens = [prefill(model, TINY_PROMPT, chunk)], []
    for pos in range(len(TINY_PROMPT), len(TINY_PROMPT) + (steps or TINY_DECODE_STEPS)):
        tokens.append(int(np.argmax(out[-1])))
        out.append(model.forward(np.array(tokens[-1:]), Batch.of(pos, 1)))
    return out, tokens


def check_tiny_model(report, tiny, make_backend):
    from zephyr import plugins
    ref_logits, ref_tokens = greedy(tiny.model(plugins.get_backend_class("reference")()), 5)
    backend = make_backend()
    logits, tokens = greedy(tiny.model(backend), 5)
    error = max(relative_error(a, b) for a, b in zip(logits, ref_logits))
    # every decode-path step after the first of its size: the second 5-token prompt chunk and the
    # decode steps after the first
    replays = 1 + TINY_DECODE_STEPS - 1
    ok = tokens == ref_tokens and error < MODEL_TOLERANCE and backend.graphs.replays == replays
    report.add("tiny model vs reference (decode path, graphs)",
               f"tokens equal: {tokens == ref_tokens}, worst logits error {error:.2g}, "
               f"graph replays {backend.graphs.replays}/{replays}", "PASS" if ok else "FAIL")
    eager_logits, eager_tokens = greedy(tiny.model(make_backend(), graphs=False), 12)
    graph_logits, graph_tokens = greedy(tiny.model(make_backend(), graphs=True), 12)
    same = eager_tokens == graph_tokens and all(np.array_equal(a, b) for a, b in zip(eager_logits, graph_logits))
    prompt_error = relative_error(graph_logits[0], ref_logits[0])
    report.add("CUDA-graph decode == eager decode (bitwise)", str(same), "PASS" if same else "FAIL")
    report.add("tiny model, 12-token prompt on the f16 cuBLAS path vs reference",
               f"logits error {prompt_error:.2g} (f16 rounding instead of 8-bit; info)", "INFO")


def check_sequences(report, tiny, make_backend):
    from zephyr.backend import Batch
    prompts = SEQUENCE_PROMPTS

    def run(together, graphs=True):
        """Greedy steps of every sequence after its prompt: each alone (one token of one sequence
        a step, in turns) or together (one token of each a step); logits [seq][step]."""
        model = tiny.model(make_backend(), graphs=graphs, n_seqs=len(prompts))
        logits = [[prefill(model, prompt, 12, seq)[0]] for seq, prompt in enumerate(prompts)]
        for step in range(SEQUENCE_STEPS):
            tokens = [int(np.argmax(row[-1])) for row in logits]
            positions = [len(prompt) + step for prompt in prompts]
            if together:
                out = model.forward(np.array(tokens), Batch(positions, range(len(prompts))),
                                    rows=range(len(prompts)))
            else:
                out = [model.forward(np.array([token]), Batch.of(pos, 1, seq))[0]
                       for seq, (token, pos) in enumerate(zip(tokens, positions))]
            for row, step_logits in zip(logits, out):
                row.append(step_logits)
        return np.array(logits)

    alone, together = run(together=False), run(together=True)
    error = relative_error(together, alone)
    same_tokens = np.array_equal(alone.argmax(-1), together.argmax(-1))
    report.add(f"{len(prompts)} sequences decoding in one batch == each decoding alone",
               f"bitwise equal: {np.array_equal(alone, together)}, greedy tokens equal: {same_tokens}, "
               f"worst logits error {error:.2g}", "PASS" if same_tokens and error <= TOLERANCE else "FAIL")
    eager = run(together=False, graphs=False)
    same = np.array_equal(eager, alone)
    report.add(f"CUDA-graph decode == eager decode across {len(prompts)} sequences (bitwise)", str(same),
               "PASS" if same else "FAIL")

    f16_logits, f16_tokens = greedy(tiny.model(make_backend(), "F16", kv_cache_type="f16"), 12, SEQUENCE_STEPS)
    f32_logits, f32_tokens = greedy(tiny.model(make_backend(), "F16", kv_cache_type="f32"), 12, SEQUENCE_STEPS)
    error = max(relative_error(a, b) for a, b in zip(f16_logits, f32_logits))
    ok = f16_tokens == f32_tokens and error < F16_CACHE_TOLERANCE
    report.add("f16 KV cache vs f32 KV cache (tiny model of f16 weights)",
               f"greedy tokens equal: {f16_tokens == f32_tokens}, worst logits error {error:.2g} "
               f"(bound {F16_CACHE_TOLERANCE:g})", "PASS" if ok else "FAIL")


# -- 5-8: performance -----------------------------------------------------------------------------

def bandwidth(report):
    import cupy as cp
    n = 1 << 30
    src, dst = cp.ones(n // 4, cp.float32), cp.empty(n // 4, cp.float32)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    best = float("inf")
    for _ in range(6):
        start.record()
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, n, cp.cuda.runtime.memcpyDeviceToDevice, 0)
        end.record()
        end.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, end) / 1e3)
    rate = 2 * n / best / 1e9
    report.add("device copy bandwidth (read + write, 1 GiB memcpy)", f"{rate:.0f} GB/s", "INFO")
    del src, dst
    cp.get_default_memory_pool().free_all_blocks()
    return rate


def build_7b(report, workdir):
    from zephyr.testing.synthetic import write_llama_model
    path = workdir / "zephyr-7b-Q4_K_M.gguf"
    t = time.perf_counter()
    write_llama_model(path, "zephyr-7b", "Q4_K_M")
    report.add("write synthetic Zephyr-7B Q4_K_M", f"{path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", "INFO")
    return path


def weight_bytes_per_token(path):
    """Bytes of every weight the GPU reads per decode token: all but the token embedding."""
    from zephyr import gguf
    with gguf.read(path) as file:
        return sum(t.nbytes for t in file.tensors if t.name.startswith("blk.") or t.name == "output.weight")


def run_7b(report, path, args, copy_rate):
    import cupy as cp
    from zephyr import AutoModelForCausalLM
    from zephyr.backend import Batch
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 32000, args.prompt_tokens).astype(np.int32)
    t = time.perf_counter()
    llm = AutoModelForCausalLM.from_pretrained(str(path), gpu_layers=-1, context_length=1024,
                                               batch_size=args.prompt_tokens, sequences=BATCHED_SEQUENCES)
    model = llm.model
    backend = llm.placement.head
    model.forward(prompt[:1], Batch.of(0, 1))
    report.add("7B load (all layers on the GPU) to first logits", f"{time.perf_counter() - t:.1f} s", "INFO")

    model.forward(prompt, Batch.of(0, len(prompt)))   # warm-up: cuBLAS heuristics, kernel loads
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        logits = model.forward(prompt, Batch.of(0, len(prompt)))
        times.append(time.perf_counter() - t)
    prefill = len(prompt) / min(times)
    report.add(f"7B prefill, {len(prompt)}-token prompt", f"{prefill:.0f} tok/s (target >= {TARGET_PREFILL:.0f})",
               "PASS" if prefill >= TARGET_PREFILL else "FAIL")

    pos, token = len(prompt), int(np.argmax(logits))
    for _ in range(4):   # eager step, capture, replays
        token = int(np.argmax(model.forward(np.array([token], np.int32), Batch.of(pos, 1))))
        pos += 1
    t = time.perf_counter()
    for _ in range(args.decode_tokens):
        token = int(np.argmax(model.forward(np.array([token], np.int32), Batch.of(pos, 1))))
        pos += 1
    decode = args.decode_tokens / (time.perf_counter() - t)
    per_token = weight_bytes_per_token(path)
    roofline = copy_rate * 1e9 / per_token if copy_rate else float("nan")
    report.add(f"7B decode, {args.decode_tokens} tokens after the prompt (forward + argmax per token)",
               f"{decode:.0f} tok/s (target >= {TARGET_DECODE:.0f}); {per_token / 1e9:.2f} GB of weights a token, "
               f"roofline {roofline:.0f} tok/s at the copy bandwidth: {100 * decode / roofline:.0f} %",
               "PASS" if decode >= TARGET_DECODE else "FAIL")

    graph = backend.graphs.graph(1)
    if graph is not None:
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(backend.stream)
        for _ in range(50):
            graph.launch(stream=backend.stream)
        end.record(backend.stream)
        end.synchronize()
        layers_only = 50 / (cp.cuda.get_elapsed_time(start, end) / 1e3)
        report.add(f"7B decode graph replayed alone ({len(model.blocks)} layers, no head, no host work)",
                   f"{layers_only:.0f} steps/s", "INFO")

    backend.cuda_graphs = False
    t = time.perf_counter()
    for _ in range(16):
        token = int(np.argmax(model.forward(np.array([token], np.int32), Batch.of(pos, 1))))
        pos += 1
    report.add("7B decode without CUDA graphs (eager launches)", f"{16 / (time.perf_counter() - t):.0f} tok/s", "INFO")
    backend.cuda_graphs = True

    # Every sequence continues sequence 0's context: one decode token of each a step.
    cache = model.caches[id(backend)]
    for seq in range(1, BATCHED_SEQUENCES):
        cache.copy_sequence(0, seq, pos)
    tokens = np.full(BATCHED_SEQUENCES, token, np.int32)
    rows = range(BATCHED_SEQUENCES)
    steps = args.decode_tokens // 4
    for i in range(steps + 3):   # eager step, capture, replays; then timed
        if i == 3:
            t = time.perf_counter()
        batch = Batch(np.full(BATCHED_SEQUENCES, pos), rows)
        tokens = model.forward(tokens, batch, rows=rows).argmax(axis=1).astype(np.int32)
        pos += 1
    elapsed = time.perf_counter() - t
    report.add(f"7B decode, {BATCHED_SEQUENCES} sequences in one batch ({steps} steps)",
               f"{BATCHED_SEQUENCES * steps / elapsed:.0f} tok/s in all, {steps / elapsed:.0f} steps/s", "INFO")

    consistency = short_run(llm)
    llm.close()
    del llm, model, backend
    cp.get_default_memory_pool().free_all_blocks()
    return consistency


def short_run(llm, steps=8):
    """A 32-token prompt in chunks of 8 and greedy steps: the run the split is compared with."""
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 32000, 32)]
    llm.reset()
    llm.eval(prompt, batch_size=8)
    logits, tokens = [llm.logits], []
    t = time.perf_counter()
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        llm.eval(tokens[-1:])
        logits.append(llm.logits)
    return logits, tokens, steps / (time.perf_counter() - t)


def run_split(report, path, args, all_gpu):
    from zephyr import AutoModelForCausalLM
    t = time.perf_counter()
    with AutoModelForCausalLM.from_pretrained(str(path), gpu_layers=args.split_layers, context_length=1024,
                                              threads=os.cpu_count()) as llm:
        load = time.perf_counter() - t
        logits, tokens, rate = short_run(llm)
        report.add(f"split run: last {args.split_layers} layers on the GPU, the rest on the CPU ({llm.placement.describe()})",
                   f"load {load:.1f} s, decode {rate:.1f} tok/s", "INFO")
    if all_gpu is None:
        return
    gpu_logits, gpu_tokens, _ = all_gpu
    error = max(relative_error(a, b) for a, b in zip(logits, gpu_logits))
    same = tokens == gpu_tokens
    report.add("split run vs all-GPU run (same prompt, 8-token chunks, greedy)",
               f"tokens equal: {same}, worst logits error {error:.2g}", "PASS" if same and error < MODEL_TOLERANCE else "FAIL")


def run_pytest(report):
    suites = [["tests/backends/test_conformance.py", "-k", "cuda"], ["tests/backends/test_cuda.py", "-m", "gpu"]]
    for suite in suites:
        timeout = max(10, report.left() - 5)
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suite],
                                    cwd=REPO, capture_output=True, text=True, timeout=timeout)
            summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
            report.add(f"pytest {' '.join(suite)}", summary, "PASS" if result.returncode == 0 else "FAIL")
            if result.returncode:
                print(result.stdout[-6000:])
        except subprocess.TimeoutExpired:
            report.add(f"pytest {' '.join(suite)}", f"timed out after {timeout:.0f} s", "FAIL")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float,
                        help="seconds for the whole run (default 330; 1200 with --emulate, whose kernels run slowly)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--split-layers", type=int, default=16)
    parser.add_argument("--no-7b", action="store_true", help="skip stages 6-8")
    parser.add_argument("--no-pytest", action="store_true", help="skip stage 9")
    parser.add_argument("--out", help="Markdown file (default: $OUT/gpu_check.md when $OUT is set)")
    parser.add_argument("--emulate", action="store_true",
                        help="stages 1-4 on the CPU kernel emulator instead of a GPU (checks this script)")
    args = parser.parse_args(argv)
    report = Report(args.budget or (1200 if args.emulate else 330))
    make_backend = emulated_backend if args.emulate else cupy_backend
    with tempfile.TemporaryDirectory(prefix="zephyr-gpu-check-") as tmp:
        workdir = Path(tmp)
        report.stage("device", 5, emulator_info if args.emulate else device_info)
        usable = any(c == "cuda backend available" and s == "PASS" for c, _, s in report.rows)
        tiny = TinyModels(workdir)
        if usable:
            report.stage("compile", 20, compile_kernels, make_backend)
            report.stage("ops vs reference", 20, check_ops, make_backend)
            report.stage("tiny model", 15, check_tiny_model, tiny, make_backend)
            report.stage("sequences", 15, check_sequences, tiny, make_backend)
        tiny.close()
        if usable and not args.emulate:
            copy_rate = report.stage("bandwidth", 5, bandwidth)
            if not args.no_7b:
                path = report.stage("build 7B", 100, build_7b, workdir)
                all_gpu = None
                if path is not None:
                    all_gpu = report.stage("7B on the GPU", 60, run_7b, path, args, copy_rate)
                    report.stage("7B split", 40, run_split, path, args, all_gpu)
            if not args.no_pytest:
                report.stage("pytest", 30, run_pytest)
    text = report.markdown()
    print("\n" + text)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.md") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"written to {out}")
    return 0 if all(s != "FAIL" for _, _, s in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
