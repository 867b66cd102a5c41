"""The pure helpers of benchmarks/bench_cpu.py (no timing): roofline bytes, KV size, targets, Markdown."""
import importlib.util
from pathlib import Path

import pytest

from zephyr import gguf
from zephyr.testing.synthetic import PRESETS, llama_tensors, write_llama_model

BENCH_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_kv_cache_bytes_of_mistral_7b_at_512(bench):
    shape = PRESETS["zephyr-7b"]
    kv_dim = shape.n_kv_heads * shape.head_dim
    assert bench.kv_cache_bytes(shape.n_layers, 512, kv_dim) == 2 * 32 * 512 * 1024 * 4


def test_prompt_ids_are_fixed_and_in_range(bench):
    ids = bench.prompt_ids(32000, 64)
    assert ids == bench.prompt_ids(32000, 64)
    assert len(ids) == 64 and all(300 <= i < 32000 for i in ids)


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


def test_check_targets(bench, tmp_path):
    spec = bench.MODELS["q4_k_m"]
    facts = bench.ModelFacts(path=tmp_path, file_bytes=4_000_000_000, bytes_per_token=0, kv_bytes=0, vocab_size=0)
    mine = {"decode_tok_s": 6.0, "prefill_tok_s": 20.0, "load_s": 2.0, "peak_rss_bytes": 4_500_000_000}
    theirs = {"decode_tok_s": 5.0, "prefill_tok_s": 20.0}
    assert bench.check_targets(spec, facts, mine, theirs) == "PASS"
    verdict = bench.check_targets(spec, facts, dict(mine, decode_tok_s=5.5, peak_rss_bytes=5e9), theirs)
    assert verdict.startswith("FAIL") and "decode 1.10x < 1.2x" in verdict and "RSS 5.00 > 4.60 GB" in verdict
    assert bench.check_targets(spec, facts, mine, None) == "PASS (ratios n/a)"


def test_each_model_gets_the_roofline_of_its_own_bandwidth(bench, tmp_path):
    """% roofline divides by the bandwidth measured around that model's runs, not a global one."""
    run = {"load_s": 1.0, "prefill_tok_s": 20.0, "decode_tok_s": 5.0, "peak_rss_bytes": 1e9,
           "rss_before_load_bytes": 5e7}
    results = []
    for key in ("q4_k_m", "q8_0"):
        facts = bench.ModelFacts(path=tmp_path / key, file_bytes=4e9, bytes_per_token=4e9, kv_bytes=0, vocab_size=0)
        results.append((bench.MODELS[key], facts, {"zephyr": bench.Outcome(runs=[run])}))
    bandwidths = {"q4_k_m": 25e9, "q8_0": 40e9}     # rooflines 6.25 and 10 tok/s
    rows = bench.result_rows(results, bandwidths)
    assert [row[6] for row in rows] == ["80.0", "50.0"]
    assert [row[4] for row in bench.file_rows(results, bandwidths, {"q4_k_m": 64, "q8_0": 64})] == ["25.0", "40.0"]
    assert bench.min_max(bandwidths) == "25.0-40.0 GB/s" and bench.min_max({}) == "none measured"
