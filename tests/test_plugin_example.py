"""The third-party plugin path end to end: pip installs examples/zephyr-example-backend into a fresh
virtual environment, zephyr finds it through its entry point, runs a model on it, and the backend
passes the conformance suite. Also: docs/plugins.md documents every hook."""
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from zephyr import hookspecs
from zephyr.testing.synthetic import write_llama_model

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "zephyr-example-backend"


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory):
    """The python of a new virtual environment holding the example plugin, pip-installed from a copy
    (so the build leaves nothing in the source tree). zephyr and the test tools come from this
    environment, whose site-packages the new one adds (a .pth line), as a system install would."""
    home, source = tmp_path_factory.mktemp("venv"), tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv.create(home, with_pip=True)
    python = home / "bin" / "python"
    own_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                              text=True, check=True).stdout.strip()
    Path(own_site, "zephyr-test-parent.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages()))
    command = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", str(source)]
    if _can_build_without_isolation():
        command.insert(4, "--no-build-isolation")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return python


def _can_build_without_isolation() -> bool:
    """Whether this environment can build a setuptools wheel itself (setuptools >= 70.1, or an older
    one with the wheel package); otherwise pip fetches a build environment from PyPI."""
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def run(python, *args, **extra_env):
    result = subprocess.run([python, *args], env=dict(os.environ, **extra_env), capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_zephyr_discovers_the_installed_plugin(plugin_python):
    out = run(plugin_python, "-m", "zephyr.cli", "backends")
    assert re.search(r"^example\s+device=cpu\s+score=-1\s+available$", out, re.MULTILINE), out
    off = run(plugin_python, "-m", "zephyr.cli", "backends", ZEPHYR_EXAMPLE_BACKEND_OFF="1")
    assert "unavailable: switched off by ZEPHYR_EXAMPLE_BACKEND_OFF" in off


def test_a_model_runs_on_the_plugin_backend(plugin_python, tmp_path):
    model = write_llama_model(tmp_path / "tiny.gguf", "tiny", "Q4_0")
    script = f"""
import json
from importlib.metadata import entry_points
from zephyr import AutoModelForCausalLM
with AutoModelForCausalLM.from_pretrained({str(model)!r}, backend="example") as llm:
    text = llm("hello", max_new_tokens=4, temperature=0)
    found = [ep.value for ep in entry_points(group="zephyr.backends") if ep.name == "example"]
    print(json.dumps({{"entry_point": found, "placement": llm.placement.describe(),
                      "swiglu_calls": llm.placement.layers[0].swiglu_calls, "text": text}}))
"""
    report = json.loads(run(plugin_python, "-c", script).strip().splitlines()[-1])
    assert report["entry_point"] == ["zephyr_example_backend"]
    assert report["placement"] == "layers 0-1 on example; output head on example"
    assert report["swiglu_calls"] > 0 and report["text"]
    cli = run(plugin_python, "-m", "zephyr.cli", "generate", str(model), "-p", "hello", "--backend", "example",
              "--max-new-tokens", "4", "--temperature", "0")
    assert cli.startswith("hello") and report["text"] in cli


def test_the_plugin_passes_conformance(plugin_python):
    """What docs/plugins.md promises a stranger: follow it, and the conformance suite passes."""
    out = run(plugin_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/backends/test_conformance.py",
              "-k", "example")
    assert re.search(r"\b\d{2,} passed", out) and "failed" not in out, out


def test_every_hook_is_in_the_plugin_guide():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("zephyr_")]
    assert hooks
    for hook in hooks:
        assert re.search(rf"`{hook}\(", guide), f"docs/plugins.md does not document {hook}"
    assert "examples/zephyr-example-backend" in guide and "backends.md" in guide
