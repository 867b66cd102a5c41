"""Where a model comes from: a GGUF file, a directory holding some, a Hugging Face repo id, or a named
model (`demo`, `gemma3-270m`); and the progress bars shown while a model is fetched and loaded."""
import inspect
import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from .demo import NAMED_MODELS, named_model_path
from .errors import ZephyrError

log = logging.getLogger(__name__)

# When a Hub repo holds several quantisations and no model_file is given, the first of these it
# has is loaded: Q4_K_M is the usual balance of size and quality, then the neighbours around it.
PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q4_0", "Q6_K", "Q8_0", "Q3_K_L", "Q3_K_M",
                    "Q4_1", "Q5_0", "Q5_1", "Q3_K_S", "Q2_K", "F16", "BF16", "F32")
_SPLIT_PART = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


class ModelNotFoundError(ZephyrError, FileNotFoundError):
    """No GGUF file could be found or fetched for what the user named."""


def resolve_model_file(source, *, model_file=None, local_files_only=False, revision=None, progress=None) -> Path:
    """The local path of the GGUF file that `source` (+ `model_file`) names, downloading if needed.
    progress=False silences the download bar (see `load_progress` for the other values)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _pick_in_directory(path, model_file)
    if str(source) in NAMED_MODELS:
        return named_model_path(str(source))
    if str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        return _from_hub(str(source), model_file, local_files_only, revision, progress)
    raise ModelNotFoundError(f"{source}: no such file or directory (and not a 'owner/name' Hugging Face repo id, "
                             f"nor a named model: {', '.join(NAMED_MODELS)})")


def _pick_in_directory(directory: Path, model_file):
    if model_file:
        candidate = directory / model_file
        if not candidate.is_file():
            raise ModelNotFoundError(f"{candidate} does not exist")
        return candidate
    files = sorted(directory.glob("*.gguf"), key=lambda p: (p.stat().st_size, p.name))
    if not files:
        raise ModelNotFoundError(f"{directory} contains no .gguf file; pass the file's path or model_file=")
    return files[0]   # the smallest, as ctransformers does


# -- the Hugging Face Hub ---------------------------------------------------------------------------
def quant_of(filename: str):
    """The quantisation a GGUF file name announces (e.g. 'Q4_K_M'), if it is one zephyr ranks."""
    for quant in PREFERRED_QUANTS:
        if re.search(rf"(?<![a-z0-9]){quant}(?![a-z0-9_])", filename, re.IGNORECASE):
            return quant
    return None


def choose_default_file(filenames) -> str:
    """The .gguf file to load from a repo's file list when the user named none (see PREFERRED_QUANTS).
    Split files (-00001-of-00003.gguf) and multimodal projectors (mmproj) are never chosen."""
    candidates = [name for name in filenames if name.lower().endswith(".gguf") and not _SPLIT_PART.search(name)
                  and "mmproj" not in Path(name).name.lower()]
    if not candidates:
        raise ModelNotFoundError("no single-file .gguf model among " + (", ".join(sorted(filenames)) or "no files"))

    def rank(name):
        quant = quant_of(Path(name).name)
        return (PREFERRED_QUANTS.index(quant) if quant else len(PREFERRED_QUANTS), len(name), name)
    return min(candidates, key=rank)


def _from_hub(repo_id, model_file, local_files_only, revision, progress):
    fetch = f"hf download {repo_id} {model_file}" if model_file else f"hf download {repo_id} --include '*Q4_K_M.gguf'"
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError(
            f"{repo_id!r} looks like a Hugging Face repo id, but huggingface_hub is not installed: "
            f"pip install 'zephyr[hub]' (then `{fetch}` fetches the file), or download the .gguf file and pass "
            f"its path") from None
    if not model_file:
        model_file = choose_default_file(_repo_files(huggingface_hub, repo_id, revision, local_files_only, fetch))
        quant = quant_of(Path(model_file).name)
        log.warning("%s: no model_file given; loading %s%s. Pass model_file= to choose another file.",
                    repo_id, model_file, f" (the {quant} quantisation)" if quant else "")
        fetch = f"hf download {repo_id} {model_file}"
    options = {}
    if progress is False and "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters:
        options["tqdm_class"] = _silent_tqdm()
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, model_file, revision=revision,
                                                    local_files_only=local_files_only, **options))
    except Exception as exc:
        raise ModelNotFoundError(
            f"could not get {model_file} from {repo_id!r} ({type(exc).__name__}: {exc}). Offline? Fetch it with "
            f"`{fetch}` where you have a network (it lands in the Hugging Face cache), then retry") from None


def _repo_files(huggingface_hub, repo_id, revision, local_files_only, fetch) -> list:
    """The repo's file names: from the Hub, or, offline, those already in the local Hugging Face cache."""
    from huggingface_hub import constants
    error = None
    if not (local_files_only or constants.HF_HUB_OFFLINE):
        try:
            return huggingface_hub.list_repo_files(repo_id, revision=revision)
        except Exception as exc:   # offline, or the repo is gated, missing, ...: look in the cache
            error = f"{type(exc).__name__}: {exc}"
    cached = _cached_files(huggingface_hub, repo_id)
    if cached:
        return cached
    raise ModelNotFoundError(
        f"could not list the files of {repo_id!r} ({error or 'offline'}) and none are cached. Choose a file with "
        f"model_file=, or fetch one with `{fetch}` where you have a network, then retry")


def _cached_files(huggingface_hub, repo_id) -> list:
    from huggingface_hub import constants
    try:
        cache = huggingface_hub.scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:   # no cache yet
        return []
    names = set()
    for repo in cache.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            for revision in repo.revisions:
                names.update(f.file_path.relative_to(revision.snapshot_path).as_posix() for f in revision.files)
    return sorted(names)


def _silent_tqdm():
    from tqdm import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
    return Silent


# -- progress bars -----------------------------------------------------------------------------------
@contextmanager
def load_progress(progress, total: int, description: str):
    """Yield a callback(done, total) for a loading loop, or None, as `progress` asks:
    None: a tqdm bar on stderr when stderr is a terminal; True: always a bar; False: nothing;
    a callable: used as the callback."""
    if callable(progress):
        yield progress
        return
    stream = sys.stderr
    show = progress if progress is not None else bool(stream and stream.isatty())
    if not show:
        yield None
        return
    from tqdm import tqdm
    bar = tqdm(total=total, desc=description, unit="layer", file=stream, leave=False, dynamic_ncols=True)

    def update(done, _total):
        bar.update(done - bar.n)
    try:
        yield update
    finally:
        bar.close()
