"""The pure helpers of benchmarks/bench_cpu.py (no timing, no engines): roofline bytes, KV size, prompt
lists, rows, targets, kernel-rate fits, the host line, Markdown."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from zephyr import AutoModelForCausalLM, gguf
from zephyr.quants import SUPPORTED_TYPES, GGMLType
from zephyr.testing.synthetic import PRESETS, llama_tensors, write_llama_model

BENCH_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu.py"
GB = 1e9


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def facts(bench, tmp_path, key="q4_k_m", file_bytes=4e9, weight_bytes=4e9, kv_per_position=0, n_ctx=4096):
    return bench.ModelFacts(path=tmp_path / key, file_bytes=file_bytes, weight_bytes=weight_bytes,
                            kv_bytes_per_position=kv_per_position, vocab_size=32000, n_ctx=n_ctx)


def run(decode=5.0, prefill=20.0, load=1.0, rss=1e9):
    return {"load_s": load, "prefill_tok_s": prefill, "decode_tok_s": decode, "peak_rss_bytes": rss,
            "rss_before_load_bytes": 5e7}


# -- facts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_bytes_per_token_counts_every_weight_but_unread_embedding_rows(bench, tmp_path, tied):
    path = write_llama_model(tmp_path / "tiny.gguf", "tiny", "Q4_K_M", tied_embeddings=tied)
    specs = llama_tensors(PRESETS["tiny"], "Q4_K_M")
    embedding = next(s for s in specs if s.name == "token_embd.weight")
    others = sum(s.nbytes for s in specs if s.name not in ("token_embd.weight", "output.weight"))
    output = next(s.nbytes for s in specs if s.name == "output.weight")
    # tied: the embedding is the output head, read in full; untied: one row looked up, the head read in full
    expected = others + (embedding.nbytes if tied else embedding.nbytes // embedding.shape[0] + output)
    with gguf.read(path) as f:
        assert bench.weight_bytes_per_token(f.tensors) == expected


def test_kv_cache_of_mistral_7b_is_f16(bench):
    shape = PRESETS["zephyr-7b"]
    per_position = bench.kv_bytes_per_position(shape.n_layers, shape.n_kv_heads, shape.head_dim)
    assert per_position == 2 * 32 * 8 * 128 * 2          # keys and values, 32 layers, 8 heads of 128, 2 bytes
    assert 4032 * per_position / GB == pytest.approx(0.528, abs=1e-3)


def test_model_facts_of_a_file(bench, tmp_path):
    path = write_llama_model(tmp_path / "tiny.gguf", "tiny", "Q4_K_M")
    shape = PRESETS["tiny"]
    f = bench.model_facts(path, 300)
    assert f.n_ctx == 300 and f.vocab_size == shape.vocab_size and f.file_bytes == path.stat().st_size
    assert f.kv_bytes(10) == 10 * 2 * shape.n_layers * shape.n_kv_heads * (shape.d_model // shape.n_heads) * 2


def test_context_fits_the_longest_prompt_and_its_decode(bench):
    assert bench.context_length([64, 1500, 4000], 32) == 4032
    assert bench.context_length([128], 32) == 160


def test_prompt_ids_are_fixed_and_in_range(bench):
    ids = bench.prompt_ids(32000, 64)
    assert ids == bench.prompt_ids(32000, 64)
    assert len(ids) == 64 and all(300 <= i < 32000 for i in ids)


# -- prompt lists on the command line -----------------------------------------------------------
def test_prompt_lists_parse_in_order_once_each(bench):
    assert bench.parse_counts("64,1500,4000", "--prompt-tokens") == [64, 1500, 4000]
    assert bench.parse_counts(" 128 , 1000,128,3000", "--demo-prompt-tokens") == [128, 1000, 3000]
    args = bench.parse_args(["--prompt-tokens", "64,1500,4000", "--demo-prompt-tokens", "128,1000,3000"])
    assert args.prompt_tokens == [64, 1500, 4000] and args.demo_prompt_tokens == [128, 1000, 3000]
    defaults = bench.parse_args([])
    assert defaults.prompt_tokens == [64] and defaults.demo_prompt_tokens == [128] and defaults.section is None


@pytest.mark.parametrize("text, message", [("64,abc", "'abc' is not a whole number"), ("64,0", "0 must be at least 1"),
                                           ("", "'' is not a whole number")])
def test_bad_prompt_lists_are_refused(bench, capsys, text, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_counts(text, "--prompt-tokens")
    with pytest.raises(SystemExit):
        bench.parse_args(["--prompt-tokens", text])
    assert "--prompt-tokens" in capsys.readouterr().err


def test_kernel_rates_write_their_own_section(bench):
    assert bench.parse_args(["--kernel-rates"]).section == bench.KERNEL_RATES_SECTION
    assert bench.parse_args(["--kernel-rates", "--section", "rates-intel"]).section == "rates-intel"


def test_kernel_rates_take_the_repack_option(bench):
    assert bench.parse_args(["--kernel-rates"]).repack is None
    assert bench.parse_args(["--kernel-rates", "--repack"]).repack is True
    assert bench.parse_args(["--kernel-rates", "--no-repack"]).repack is False
    assert bench.parse_args(["--kernel-rates", "--isa", "avx2"]).isa == "avx2"
    assert bench.parse_args(["--isa", "avx2"]).isa == "avx2"   # the engine runs too


def test_the_zephyr_child_runs_the_forced_path(bench, monkeypatch):
    """--isa reaches the child that loads zephyr, which forces the path before it loads anything."""
    from zephyr_backends.cpu import _ops
    forced = []
    monkeypatch.setattr(_ops, "set_isa", forced.append)

    class Stop(Exception):
        pass

    def engine(*args):
        raise Stop
    monkeypatch.setattr(bench, "ZephyrEngine", engine)
    with pytest.raises(Stop):
        bench.run_child({"engine": "zephyr", "isa": "avx2", "prompt": [1], "path": "x", "threads": 1, "n_ctx": 8,
                         "flash_attn": False, "decode_tokens": 0})
    assert forced == ["avx2"]


# -- targets ------------------------------------------------------------------------------------
def test_long_context_targets_are_issue_13s(bench):
    demo, q4_k_m = bench.MODELS["demo"], bench.MODELS["q4_k_m"]
    assert (demo.targets_at(1000).prefill_ratio, demo.targets_at(1000).decode_ratio) == (1.5, 1.5)
    assert (demo.targets_at(3000).prefill_ratio, demo.targets_at(3000).decode_ratio) == (1.3, 1.3)
    assert (q4_k_m.targets_at(1500).prefill_ratio, q4_k_m.targets_at(1500).decode_ratio) == (1.3, 1.15)
    assert q4_k_m.targets_at(4000).decode_ratio == 1.15 and q4_k_m.targets_at(64).min_roofline == 0.85
    for spec in bench.MODELS.values():
        if spec.layout is not None:
            assert spec.targets_at(4000).decode_kept == (0.85, 64)
    assert bench.MODELS["q8_0"].targets_at(100) == bench.Targets()


def test_check_targets(bench, tmp_path):
    case = bench.Case(bench.MODELS["q4_k_m"], facts(bench, tmp_path), 64, 32)
    mine = run(decode=6.0, load=2.0, rss=4.5e9)
    theirs = run(decode=5.0)
    assert bench.check_targets(case, mine, theirs, roofline=7.0) == "PASS"
    verdict = bench.check_targets(case, dict(mine, decode_tok_s=5.5, peak_rss_bytes=5e9), theirs, roofline=7.0)
    assert verdict.startswith("FAIL") and "decode 1.10x < 1.2x" in verdict and "RSS 5.00 > 4.60 GB" in verdict
    assert "decode 78.6 < 85 % of roofline" in verdict
    assert bench.check_targets(case, mine, None) == "PASS (ratios, roofline n/a)"


def test_decode_at_4000_tokens_is_held_to_its_64_token_decode(bench, tmp_path):
    case = bench.Case(bench.MODELS["q4_0"], facts(bench, tmp_path, "q4_0"), 4000, 32)
    assert bench.check_targets(case, run(decode=4.3), None, decode_at={64: 5.0}) == "PASS"
    verdict = bench.check_targets(case, run(decode=4.0), None, decode_at={64: 5.0})
    assert verdict == "FAIL: decode 80.0 < 85 % of the 64-token decode"
    assert bench.check_targets(case, run(decode=4.3), None, decode_at={}) == "PASS (decode vs 64 tokens n/a)"


def test_other_families_are_held_to_the_llama_familys_speed_per_weight_byte(bench, tmp_path):
    """Issue 16: decode x weights read per token within 10 % of the llama-family model's, same run."""
    qwen2 = bench.Case(bench.MODELS["qwen2-7b"], facts(bench, tmp_path, "qwen2-7b", weight_bytes=4.5e9), 64, 32)
    llama_rate = {("q4_k_m", 64): 6.0 * 4e9}
    assert bench.check_targets(qwen2, run(decode=4.9), None, bytes_at=llama_rate) == "PASS"
    verdict = bench.check_targets(qwen2, run(decode=4.5), None, bytes_at=llama_rate)
    assert verdict == "FAIL: decode 84.4 < 90 % of q4_k_m's weight bytes/s"
    assert bench.check_targets(qwen2, run(decode=4.9), None, bytes_at={}) == "PASS (bytes/s vs q4_k_m n/a)"
    gemma, twin = bench.MODELS["gemma3-270m"], bench.MODELS["gemma3-270m-llama"]
    assert (gemma.layout, gemma.named, gemma.targets_at(128).per_byte_of) == (None, "gemma3-270m",
                                                                             (0.9, "gemma3-270m-llama"))
    assert (twin.layout, twin.named, twin.llama_twin) == (None, "gemma3-270m", True)
    assert "of Gemma 3 270M's llama twin's" in bench.target_lines([gemma], {"gemma3-270m": [128]})[1]
    assert {"gemma3-270m", "gemma3-270m-llama"} <= set(bench.DEFAULT_MODELS.split(","))


def test_a_llama_twin_is_written_once_beside_the_named_file(bench, tmp_path):
    source = write_llama_model(tmp_path / "gemma.gguf", "gemma3", "Q8_0")
    spec = bench.MODELS["gemma3-270m-llama"]
    cache = tmp_path / "cache"
    path = bench.ensure_llama_twin(source, cache)
    assert path == cache / "gemma.llama-twin.gguf" and not list(cache.glob("*.partial"))
    with gguf.read(source) as original, gguf.read(path) as twin:
        assert twin.architecture == "llama"
        kept = {t.name for t in twin.tensors}
        left_out = {t.name.split(".")[2] for t in original.tensors if t.name not in kept}
        assert left_out == {"attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"}
        for name in kept:
            assert np.array_equal(twin.tensor_data(name), original.tensor_data(name)), name
        for key in ("block_count", "embedding_length", "attention.key_length", "attention.head_count_kv"):
            assert twin.metadata[f"llama.{key}"] == original.metadata[f"gemma3.{key}"]
        assert twin.metadata["tokenizer.ggml.tokens"] == original.metadata["tokenizer.ggml.tokens"]
    with AutoModelForCausalLM.from_pretrained(str(path), context_length=32) as llm:
        llm.eval(llm.tokenize("twin"))
        assert llm.model_config.architecture == "llama" and np.isfinite(llm.logits).all()
    written = path.stat().st_mtime_ns
    assert bench.ensure_llama_twin(source, cache).stat().st_mtime_ns == written
    assert spec.llama_twin


def test_rss_budget_holds_the_kv_cache_the_row_fills(bench, tmp_path):
    f = facts(bench, tmp_path, file_bytes=4e9, kv_per_position=131072)
    case = bench.Case(bench.MODELS["q4_k_m"], f, 4000, 32)
    assert case.kv_bytes == 4032 * 131072
    assert case.rss_budget == pytest.approx((4e9 + 4032 * 131072) * 1.15)
    assert bench.check_targets(case, run(decode=9.0, rss=5.2e9), run(decode=5.0), decode_at={64: 9.0}) == "PASS"
    verdict = bench.check_targets(case, run(decode=9.0, rss=5.3e9), run(decode=5.0), decode_at={64: 9.0})
    assert verdict == "FAIL: RSS 5.30 > 5.21 GB"


def test_each_row_gets_the_roofline_of_its_bandwidth_and_kv_reads(bench, tmp_path):
    """% roofline divides by the bandwidth measured around that row's runs and counts its KV cache reads."""
    f = facts(bench, tmp_path, weight_bytes=3e9, kv_per_position=250_000)   # 64 + 36: 25 MB, 3964 + 36: 1 GB
    measured = []
    for prompt, bandwidth in ((64, 24.25e9), (3964, 40e9)):
        row = bench.Measured(bench.Case(bench.MODELS["q4_k_m"], f, prompt, 36),
                             {"zephyr": bench.Outcome(runs=[run(decode=5.0)])})
        row.bandwidths += [bandwidth, 1e9, bandwidth]                      # the median
        measured.append(row)
    # rooflines: 24.25 / 3.025 = 8.02 tok/s; 40 / 4.0 = 10 tok/s
    rows = bench.result_rows(measured)
    assert [row[6] for row in rows] == ["62.4", "50.0"]
    assert [row[3] for row in bench.case_rows(measured)] == ["3.025", "4.000"]
    assert [row[5] for row in bench.case_rows(measured)] == ["8.02", "10.0"]
    assert bench.min_max([b for m in measured for b in m.bandwidths]) == "1.0-40.0 GB/s"
    assert bench.min_max([]) == "none measured"
    assert len(bench.file_rows(measured)) == 1


def test_rows_hold_long_prompts_to_the_same_files_short_decode(bench, tmp_path):
    """decode_kept compares with zephyr's decode on the same model, never another model's."""
    measured = []
    for key, prompt, decode in (("q4_k_m", 64, 6.0), ("q4_k_m", 4000, 5.0), ("q8_0", 64, 3.0), ("q8_0", 4000, 2.9)):
        measured.append(bench.Measured(bench.Case(bench.MODELS[key], facts(bench, tmp_path, key), prompt, 32),
                                       {"zephyr": bench.Outcome(runs=[run(decode=decode)]),
                                        "llama.cpp": bench.Outcome(errors=["crashed (killed by SIGSEGV): ..."])}))
        measured[-1].bandwidths.append(40e9)
    rows = bench.result_rows(measured, skipped=[(bench.MODELS["q4_0"], "not enough disk space")])
    verdicts = {(row[0], row[1]): row[9] for row in rows if row[2] == "zephyr"}
    assert "83.3 < 85 % of the 64-token decode" in verdicts[("Zephyr-7B Q4_K_M", "4000")]
    assert "of the 64-token decode" not in verdicts[("Zephyr-7B Q8_0", "4000")]     # 2.9 / 3.0
    assert [row[9] for row in rows if row[2] == "llama.cpp"] == ["error: crashed (killed by SIGSEGV): ..."] * 4
    assert rows[-1][0] == "Zephyr-7B Q4_0" and rows[-1][9] == "not run: not enough disk space"


def test_target_lines_name_each_length(bench):
    lines = bench.target_lines([bench.MODELS["q4_k_m"]], {"q4_k_m": [64, 1500, 4000, 100]})
    assert lines[0] == ("- Zephyr-7B Q4_K_M, every prompt: load to first token < 3 s, "
                        "peak RSS <= (file + the row's KV cache) x 1.15")
    assert "decode >= 85 % of the roofline" in lines[1]
    assert lines[2] == "- Zephyr-7B Q4_K_M, 1500 tokens: decode >= 1.15x llama.cpp, prefill >= 1.3x llama.cpp"
    assert lines[3] == ("- Zephyr-7B Q4_K_M, 4000 tokens: decode >= 1.15x llama.cpp, "
                        "decode >= 85 % of its decode after 64 tokens")
    assert lines[4] == "- Zephyr-7B Q4_K_M, 100 tokens: no speed target"


# -- kernel rates ---------------------------------------------------------------------------------
def test_kernel_types_are_the_7b_files_and_computable(bench):
    assert {GGMLType[name] for name in bench.KERNEL_TYPES} <= SUPPORTED_TYPES
    assert bench.KERNEL_ROW_VALUES == (PRESETS["zephyr-7b"].d_model, PRESETS["zephyr-7b"].d_ffn)


def test_kernel_matrices_stay_within_the_l2_budget(bench):
    q4_0 = bench.kernel_matrix_rows(2304, 256 << 10)           # Q4_0 rows of 4096: whole groups of 16 rows
    assert q4_0 == [16, 48, 80, 112] and q4_0[-1] * 2304 <= 256 << 10
    f16 = bench.kernel_matrix_rows(28672, 256 << 10)           # F16 rows of 14336: only 9 fit
    assert f16 == [2, 4, 6, 9]
    with pytest.raises(ValueError, match="only 2 rows"):
        bench.kernel_matrix_rows(28672, 64 << 10)


def test_fit_separates_the_rate_from_the_cost_of_a_call(bench):
    sizes = [64e3, 128e3, 192e3, 256e3]
    rate, overhead = bench.fit_rate(sizes, [5e-6 + s / 40e9 for s in sizes])
    assert rate == pytest.approx(40e9) and overhead == pytest.approx(5e-6)
    assert bench.fit_rate(sizes, [9e-6, 8e-6, 7e-6, 6e-6])[0] is None


def test_every_call_is_timed_in_every_round(bench):
    counts = [0, 0]

    def call(i):
        counts[i] += 1
    seconds = bench.fastest_per_call([lambda: call(0), lambda: call(1)], round_s=1e-4, rounds=3)
    assert len(seconds) == 2 and all(0 < s < 1 for s in seconds)
    assert min(counts) >= 2 + 3 * 2           # calibration, then per round one untimed call and at least one timed


def test_kernel_rows_and_verdicts(bench):
    memory = {1: 16e9, 2: 30e9}
    rates = [bench.KernelRate("Q4_K", 4096, 1, "row-major", 48e9, 4e-6, 258048),
             bench.KernelRate("Q4_K", 4096, 2, "row-major", 66e9, 6e-6, 258048),
             bench.KernelRate("Q4_K", 14336, 1, "row-major", 40e9, 5e-6, 258048),
             bench.KernelRate("Q4_K", 14336, 2, "row-major", 55e9, 7e-6, 258048),
             bench.KernelRate("Q8_0", 4096, 1, "row-major", 60e9, 4e-6, 261120),
             bench.KernelRate("Q8_0", 4096, 2, "row-major", None, 6e-6, 261120)]
    rows = bench.kernel_rows(rates, memory)
    assert bench.kernel_columns([1, 2]) == ["type", "row values", "layout", "largest matrix KB", "GB/s, 1 thread",
                                            "x memory, 1", "GB/s, 2 threads", "x memory, 2",
                                            "fixed us per call (1, 2 threads)"]
    assert rows[0] == ["Q4_K", "4096", "row-major", "252", "48.0", "3.00", "66.0", "2.20", "4.0, 6.0"]
    assert rows[2][6:8] == ["noisy", "-"]
    assert bench.kernel_verdicts(rates, memory) == [
        "- Q4_K: FAIL (lowest 1.83x < 2x: rows of 14336, 2 threads, 55.0 GB/s against 30.0)",
        "- Q8_0: n/a (a fit without a positive slope: rerun on a quieter machine)"]
    assert bench.kernel_verdicts(rates[:2], memory)[0].startswith("- Q4_K: PASS (lowest 2.20x >= 2x")


# -- the host -----------------------------------------------------------------------------------
AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 2
flags\t\t: fpu sse avx2 fma f16c

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: something else
"""

INTEL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
stepping\t: 8
flags\t\t: avx2 avx512f avx512_vnni amx_tile
"""


def test_cpu_identity_names_vendor_and_numbers(bench):
    amd = bench.cpu_identity(AMD_CPUINFO)
    assert (amd["vendor"], amd["model_name"], amd["family"], amd["model"], amd["stepping"]) == \
        ("AMD", "AMD EPYC", "23", "1", "2")
    assert amd["flags"] == {"fpu", "sse", "avx2", "fma", "f16c"}
    intel = bench.cpu_identity(INTEL_CPUINFO)
    assert (intel["vendor"], intel["family"], intel["model"]) == ("Intel", "6", "143")
    assert bench.cpu_identity("")["vendor"] == "?"


def test_host_line(bench):
    machine = {"cpu": "AMD EPYC", "vendor": "AMD", "family": "23", "model": "1", "stepping": "2", "cores": 2,
               "ram": "25.3 GB", "isa": "avx2, fma, f16c", "l2_bytes": 512 << 10, "kernels": "avx2",
               "os": "Linux 6.1"}
    assert bench.host_line(machine) == ("AMD EPYC (family 23, model 1, stepping 2), 2 logical CPUs, L2 512 KB per "
                                        "core, 25.3 GB RAM, ISA avx2, fma, f16c, zephyr kernels: avx2, Linux 6.1")
    assert bench.host_line(dict(machine, cpu="EPYC 9R14", l2_bytes=None)).startswith("AMD EPYC 9R14 (family 23")
    assert "L2 size unknown" in bench.host_line(dict(machine, l2_bytes=None))


def test_machine_description_of_this_host(bench):
    machine = bench.machine_description()
    assert machine["kernels"] in ("scalar", "avx2", "avx512")
    assert {"cores", "ram", "os", "cpu"} <= machine.keys()        # benchmarks/bench_ray.py reads these


@pytest.mark.parametrize("text, size", [("512K", 512 << 10), ("2048K\n", 2 << 20), ("32M", 32 << 20)])
def test_cache_sizes(bench, text, size):
    assert bench.parse_cache_size(text) == size


# -- Markdown sections ----------------------------------------------------------------------------
def test_generated_section_replaced_and_hand_text_kept(bench):
    first = bench.replace_generated_section("", "run 1\n")
    assert first.startswith("# Benchmarks\n") and "run 1" in first
    hand = "# Benchmarks\n\nWritten by hand.\n\n" + first.split("\n", 2)[2] + "\nFooter by hand.\n"
    second = bench.replace_generated_section(hand, "run 2\n")
    assert "run 1" not in second and "run 2" in second
    assert second.startswith("# Benchmarks\n\nWritten by hand.\n") and second.endswith("\nFooter by hand.\n")
    assert second.count(bench.BEGIN_MARKER) == 1 and second.count(bench.END_MARKER) == 1
    assert bench.replace_generated_section(second, "run 2\n") == second


def test_generated_section_appended_to_a_file_without_markers(bench):
    text = bench.replace_generated_section("# Notes\n\nKeep me.\n", "table\n")
    assert text.startswith("# Notes\n\nKeep me.\n\n" + bench.BEGIN_MARKER)


def test_named_sections_are_replaced_apart(bench):
    text = bench.replace_generated_section("# Benchmarks\n", "main 1\n")
    text = bench.replace_generated_section(text, "other 1\n", "other-quants")
    text = bench.replace_generated_section(text, "main 2\n")
    text = bench.replace_generated_section(text, "other 2\n", "other-quants")
    assert "main 2" in text and "other 2" in text and "main 1" not in text and "other 1" not in text
    begin, end = bench.markers("other-quants")
    assert text.count(begin) == 1 and text.count(end) == 1 and text.count(bench.BEGIN_MARKER) == 1
    assert text.index(bench.END_MARKER) < text.index(begin)


def test_section_names_must_be_safe_in_a_comment(bench, capsys):
    assert bench.parse_args(["--section", "other-quants"]).section == "other-quants"
    with pytest.raises(SystemExit):
        bench.parse_args(["--section", "x-->"])
    assert "--section" in capsys.readouterr().err


def test_unpaired_markers_are_refused(bench):
    with pytest.raises(ValueError, match="unpaired"):
        bench.replace_generated_section(f"{bench.BEGIN_MARKER}\nhalf a section\n", "new\n")


# -- benchmarks/bench_serve.py --------------------------------------------------------------------
def test_decoding_rate_counts_only_while_every_stream_decodes(monkeypatch):
    """The window opens at the last stream's first chunk and closes at the first stream's last:
    a stream still waiting for its prompt, or one already done, leaves the others' chunks out."""
    pytest.importorskip("openai")
    monkeypatch.syspath_prepend(str(BENCH_PATH.parent))
    from bench_serve import decoding_rate
    assert decoding_rate([[0.0, 1.0, 2.0, 3.0]]) == pytest.approx(1.0)           # one stream: (n - 1) / its span
    early, late = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0], [1.0, 2.0, 3.0, 4.0]     # late waits for its prompt
    assert decoding_rate([early, late]) == pytest.approx((4 + 2) / 2.0)         # (1, 3]: 4 of early's, 2 of late's
    assert np.isnan(decoding_rate([[0.0, 1.0], [2.0, 3.0]]))                      # never all decoding at once
