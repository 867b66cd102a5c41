"""Model sources (zephyr/sources.py): Hugging Face Hub downloads through a fake local Hub cache and
mocked file listings (never the network), the default quantisation, and load progress bars."""
import hashlib
import io
import logging
import sys
import time
from pathlib import Path

import pytest

from zephyr import AutoModelForCausalLM
from zephyr.sources import ModelNotFoundError, choose_default_file, load_progress, quant_of
from zephyr.testing.synthetic import write_llama_model

hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

REPO = "TheBloke/zephyr-7B-beta-GGUF"
LISTING = ["README.md", "config.json"] + [f"zephyr-7b-beta.{q}.gguf" for q in
                                          ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0")]


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    return write_llama_model(tmp_path_factory.mktemp("hub") / "tiny.gguf", "tiny", "Q4_0").read_bytes()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, offline: `add(repo, name, data)` puts a file in it
    the way huggingface_hub lays out a download (a blob, and a snapshot symlink to it)."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"

    def add(repo, name, data):
        folder = root / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../../blobs") / blob.name)
        return link
    return add


# -- choosing a file -----------------------------------------------------------------------------------
@pytest.mark.parametrize("names, expected", [
    (LISTING, "zephyr-7b-beta.Q4_K_M.gguf"),
    (["m.Q8_0.gguf", "m.Q5_K_M.gguf", "m.Q4_0.gguf"], "m.Q5_K_M.gguf"),
    (["model-q8_0.gguf", "model-f16.gguf"], "model-q8_0.gguf"),                     # lower case names too
    (["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf", "m-Q6_K.gguf"], "m-Q6_K.gguf"),
    (["mmproj-model-Q4_K_M.gguf", "model-Q8_0.gguf"], "model-Q8_0.gguf"),
    (["weird-name.gguf"], "weird-name.gguf"),
])
def test_the_default_file_prefers_q4_k_m(names, expected):
    assert choose_default_file(names) == expected


def test_quant_names_are_matched_whole():
    assert quant_of("zephyr-7b-beta.Q4_K_M.gguf") == "Q4_K_M" and quant_of("x.Q4_K_S.gguf") == "Q4_K_S"
    assert quant_of("x-Q4_0_4_4.gguf") is None and quant_of("x.IQ4_XS.gguf") is None
    with pytest.raises(ModelNotFoundError, match="no single-file .gguf model among README.md"):
        choose_default_file(["README.md"])


# -- downloads --------------------------------------------------------------------------------------------
def test_a_named_file_comes_from_the_hub_cache(hub_cache, tiny_bytes):
    cached = hub_cache(REPO, "zephyr-7b-beta.Q4_K_M.gguf", tiny_bytes)
    with AutoModelForCausalLM.from_pretrained(REPO, model_file="zephyr-7b-beta.Q4_K_M.gguf") as llm:
        assert Path(llm.model_path) == cached and llm("hi", max_new_tokens=2, temperature=0) is not None


def test_without_model_file_the_listing_decides_and_says_which(monkeypatch, hub_cache, tiny_bytes, caplog):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cached = hub_cache(REPO, "zephyr-7b-beta.Q4_K_M.gguf", tiny_bytes)
    monkeypatch.setattr(hub, "list_repo_files", lambda repo_id, revision=None: list(LISTING))
    calls = []

    def download(repo_id, filename, *, revision=None, local_files_only=False, tqdm_class=None):
        calls.append((repo_id, filename, tqdm_class))
        return str(cached)
    monkeypatch.setattr(hub, "hf_hub_download", download)
    with caplog.at_level(logging.WARNING, logger="zephyr.sources"):
        with AutoModelForCausalLM.from_pretrained(REPO, progress=False) as llm:
            assert Path(llm.model_path) == cached
    assert [(r, f) for r, f, _ in calls] == [(REPO, "zephyr-7b-beta.Q4_K_M.gguf")]
    assert calls[0][2] is not None and calls[0][2](total=1).disable   # progress=False silences the download bar
    assert "loading zephyr-7b-beta.Q4_K_M.gguf (the Q4_K_M quantisation)" in caplog.text


def test_offline_without_model_file_chooses_among_cached_files(monkeypatch, hub_cache, tiny_bytes):
    hub_cache(REPO, "zephyr-7b-beta.Q8_0.gguf", tiny_bytes)
    cached = hub_cache(REPO, "zephyr-7b-beta.Q4_K_M.gguf", tiny_bytes)
    monkeypatch.setattr(hub, "list_repo_files", lambda *a, **k: pytest.fail("listed the repo while offline"))
    with AutoModelForCausalLM.from_pretrained(REPO) as llm:
        assert Path(llm.model_path) == cached


def test_a_failed_listing_falls_back_to_the_cache(monkeypatch, hub_cache, tiny_bytes):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cached = hub_cache(REPO, "zephyr-7b-beta.Q6_K.gguf", tiny_bytes)

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to the Hub")
    monkeypatch.setattr(hub, "list_repo_files", unreachable)
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo_id, filename, **kw: str(cached.parent / filename))
    with AutoModelForCausalLM.from_pretrained(REPO) as llm:
        assert Path(llm.model_path) == cached


def test_offline_errors_name_the_file_and_the_command(hub_cache):
    with pytest.raises(ModelNotFoundError) as missing:
        AutoModelForCausalLM.from_pretrained(REPO, model_file="zephyr-7b-beta.Q5_K_M.gguf")
    assert "zephyr-7b-beta.Q5_K_M.gguf" in str(missing.value)
    assert f"`hf download {REPO} zephyr-7b-beta.Q5_K_M.gguf`" in str(missing.value)
    with pytest.raises(ModelNotFoundError) as unlisted:
        AutoModelForCausalLM.from_pretrained(REPO)
    assert f"`hf download {REPO} --include '*Q4_K_M.gguf'`" in str(unlisted.value)
    assert "model_file=" in str(unlisted.value)


def test_without_the_hub_extra_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelNotFoundError) as missing:
        AutoModelForCausalLM.from_pretrained(REPO, model_file="zephyr-7b-beta.Q4_K_M.gguf")
    message = str(missing.value)
    assert "pip install 'zephyr[hub]'" in message and f"hf download {REPO} zephyr-7b-beta.Q4_K_M.gguf" in message


# -- load progress --------------------------------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_bytes):
    path = tmp_path_factory.mktemp("progress") / "tiny.gguf"
    path.write_bytes(tiny_bytes)
    return path


def test_a_progress_callback_sees_every_layer(tiny_path):
    seen = []
    AutoModelForCausalLM.from_pretrained(str(tiny_path), progress=lambda *step: seen.append(step)).close()
    assert seen == [(1, 2), (2, 2)]


@pytest.mark.parametrize("terminal, progress, shown", [
    (True, None, True), (False, None, False), (True, False, False), (False, True, True)])
def test_a_progress_bar_only_on_a_terminal_unless_asked(monkeypatch, tiny_path, terminal, progress, shown):
    stderr = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    AutoModelForCausalLM.from_pretrained(str(tiny_path), progress=progress).close()
    assert ("loading tiny.gguf" in stderr.getvalue()) == shown
    if not shown:
        assert stderr.getvalue() == ""


def test_load_progress_counts_to_the_total(monkeypatch):
    stderr = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    with load_progress(True, 3, "loading x") as report:
        for done in (1, 2, 3):
            time.sleep(0.15)   # tqdm redraws at most every 0.1 s
            report(done, 3)
    assert "3/3" in stderr.getvalue()
