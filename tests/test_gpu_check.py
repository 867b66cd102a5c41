"""benchmarks/gpu_check.py on the CPU kernel emulator (--emulate): the script a device session runs
must work before the session starts. Small attention shapes, a small vocabulary and few decode
steps keep it quick."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from zephyr_backends.cuda import emulation

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.skipif(not emulation.compiler_available(), reason="the kernel emulator needs g++ on x86-64")


@pytest.fixture
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ATTENTION_SHAPES", module.ATTENTION_SHAPES[:1])
    monkeypatch.setattr(module, "TINY_DECODE_STEPS", 2)
    monkeypatch.setattr(module, "SEQUENCE_STEPS", 2)
    monkeypatch.setattr(module, "TINY_VOCAB", 1024)
    return module


def rows(markdown):
    """{check: status} of the report's table."""
    table = [line.split(" | ") for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0][2:]: cells[-1].rstrip(" |") for cells in table[1:]}


def test_correctness_stages_pass_on_the_emulator(gpu_check, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--emulate", "--out", str(out)]) == 0
    text = out.read_text()
    assert "the CPU kernel emulator" in text
    status = rows(text)
    for check in ("cuda backend available", "compile all kernel files",
                  "matmul, decode path (8-bit activations as the reference)", "matmul, prompt path (f16 cuBLAS)",
                  "embed", "rms_norm, rope, swiglu, add",
                  "attention (prompt, flash-decoding splits, windows, GQA, sequences, f16 and f32 caches)",
                  "tiny model vs reference (decode path, graphs)", "CUDA-graph decode == eager decode (bitwise)",
                  "4 sequences decoding in one batch == each decoding alone",
                  "CUDA-graph decode == eager decode across 4 sequences (bitwise)",
                  "f16 KV cache vs f32 KV cache (tiny model of f16 weights)"):
        assert status.pop(check) == "PASS", check
    assert set(status.values()) <= {"INFO"}   # nothing timed, nothing else checked on the emulator


def test_a_wrong_result_is_reported_as_a_failure(gpu_check, monkeypatch):
    from zephyr_backends.reference.backend import ReferenceBackend
    real = ReferenceBackend.rms_norm
    monkeypatch.setattr(ReferenceBackend, "rms_norm", lambda self, x, w, eps: real(self, x, w, eps) * np.float32(1.001))
    report = gpu_check.Report(budget_s=600)
    report.stage("ops vs reference", 0, gpu_check.check_ops, gpu_check.emulated_backend)
    status = {check: result for check, _, result in report.rows}
    assert status["rms_norm, rope, swiglu, add"] == "FAIL"
    assert status["embed"] == "PASS"
