"""The `zephyr` command line: generate, chat, info, backends."""
import subprocess
import sys

import pytest

from zephyr.cli import main, serve_options, server_spec
from zephyr.testing.synthetic import write_llama_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_llama_model(tmp_path_factory.mktemp("cli") / "tiny.gguf", "tiny", "Q4_K_M"))


def test_backends_lists_cpu_and_reference(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "cpu" in out and "reference" in out and "available" in out


def test_info_shows_metadata_and_tensors(capsys, tiny):
    assert main(["info", tiny]) == 0
    out = capsys.readouterr().out
    assert "llama.block_count = 2" in out and "blk.0.attn_q.weight" in out and "Q4_K" in out
    assert "ModelConfig(" in out and "family: llama (Llama" in out


def test_info_names_the_family(capsys, tmp_path):
    path = write_llama_model(tmp_path / "gemma3.gguf", "gemma3", "Q8_0", name="synthetic")
    assert main(["info", str(path)]) == 0
    assert "family: gemma3 (Gemma 3 (text))" in capsys.readouterr().out


def test_info_of_a_named_model_of_another_family(capsys, gemma3_270m_path):
    assert main(["info", "gemma3-270m"]) == 0
    out = capsys.readouterr().out
    assert "gemma-3-270m-q4_k_m.gguf: GGUF v3" in out and "general.architecture = 'gemma3'" in out


def test_generate_demo_streams_a_sensible_answer(capsys, smollm2_path):
    assert main(["generate", "demo", "-p", "The capital of France is", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and "Paris" in out


def test_chat_keeps_history_and_resets(monkeypatch, capsys, smollm2_path):
    lines = iter(["What is the capital of France? Answer in one sentence.", "/reset", "", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(smollm2_path), "--temperature", "0", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "(history cleared)" in out


def test_chat_ends_on_end_of_input(monkeypatch, capsys, tiny):
    def no_more(prompt=""):
        raise EOFError
    monkeypatch.setattr("builtins.input", no_more)
    assert main(["chat", tiny, "--chat-format", "zephyr"]) == 0


def test_errors_are_messages_not_tracebacks(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zephyr: error:") and "bad magic" in err
    assert main(["generate", str(tmp_path / "missing.gguf"), "-p", "x"]) == 1


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "zephyr.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout and "backends" in result.stdout


def test_repack_flags_reach_the_load_options():
    assert server_spec(serve_options(["demo"])).load_options["repack"] is None
    assert server_spec(serve_options(["demo", "--repack"])).load_options["repack"] is True
    assert server_spec(serve_options(["demo", "--no-repack"])).load_options["repack"] is False
