"""Where a model comes from: a GGUF file, a directory holding some, or a Hugging Face repo id."""
from pathlib import Path

from .errors import ZephyrError


class ModelNotFoundError(ZephyrError, FileNotFoundError):
    """No GGUF file could be found or fetched for what the user named."""


def resolve_model_file(source, *, model_file=None, local_files_only=False, revision=None) -> Path:
    """The local path of the GGUF file that `source` (+ `model_file`) names, downloading if needed."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _pick_in_directory(path, model_file)
    if str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        return _from_hub(str(source), model_file, local_files_only, revision)
    raise ModelNotFoundError(f"{source}: no such file or directory (and not a 'owner/name' Hugging Face repo id)")


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


def _from_hub(repo_id, model_file, local_files_only, revision):
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError(
            f"{repo_id!r} looks like a Hugging Face repo id, but huggingface_hub is not installed: "
            f"pip install 'zephyr[hub]', or download the .gguf file and pass its path") from None
    if not model_file:
        raise ModelNotFoundError(f"pass model_file= to choose which .gguf file of {repo_id!r} to load")
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, model_file, revision=revision,
                                                    local_files_only=local_files_only))
    except Exception as exc:
        raise ModelNotFoundError(
            f"could not get {model_file} from {repo_id!r} ({type(exc).__name__}: {exc}). Offline? Fetch it with "
            f"`huggingface-cli download {repo_id} {model_file}` where you have a network, then retry") from None
