"""Layer placement: which backend runs each layer, decided once at load time.

`gpu_layers=N` puts the last N layers on the GPU backend (and the output head once N covers every
layer), the rest on the CPU backend, as llama.cpp and ctransformers do. The token embedding stays
on the CPU backend. Activations cross between backends only where neighbouring layers differ.
"""
from dataclasses import dataclass

from .errors import BackendError
from .plugins import backend_classes, best_backend_class, describe_backends, get_backend_class


@dataclass(frozen=True)
class Placement:
    """One backend instance per distinct backend; `layers[i]` runs block i."""

    embedding: object          # Backend running the token embedding lookup
    layers: tuple              # Backend per block
    head: object               # Backend running the final norm and output projection

    @property
    def backends(self) -> list:
        """Distinct backends in the order activations meet them."""
        seen = []
        for b in (self.embedding, *self.layers, self.head):
            if all(b is not s for s in seen):
                seen.append(b)
        return seen

    def describe(self) -> str:
        runs, start = [], 0
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or self.layers[i] is not self.layers[start]:
                runs.append(f"layers {start}-{i - 1} on {self.layers[start].name}")
                start = i
        return "; ".join(runs + [f"output head on {self.head.name}"])


def plan_placement(n_layers: int, *, backend=None, gpu_layers=0, gpu_backend=None, options=None) -> Placement:
    """Build the placement for a model of `n_layers` blocks.

    backend: name of the backend for the non-GPU part (default: the best usable "cpu" backend).
    gpu_layers: how many of the last layers go to `gpu_backend`; -1 or more than n_layers: all.
    gpu_backend: name of the backend for those layers (default: the best usable "gpu" backend).
    options: load options (Config fields such as threads); each backend gets those it declares.
    """
    main_cls = get_backend_class(backend) if backend else _best_for_device("cpu")
    if gpu_layers is None or gpu_layers == 0:
        n_gpu = 0
    elif gpu_layers < 0 or gpu_layers > n_layers:
        n_gpu = n_layers
    else:
        n_gpu = gpu_layers
    main = _create(main_cls, options)
    if n_gpu == 0:
        return Placement(main, (main,) * n_layers, main)
    gpu_cls = get_backend_class(gpu_backend) if gpu_backend else _best_for_device("gpu", gpu_layers)
    gpu = _create(gpu_cls, options) if gpu_cls is not main_cls else main
    layers = (main,) * (n_layers - n_gpu) + (gpu,) * n_gpu
    return Placement(main, layers, gpu if n_gpu == n_layers else main)


def _create(cls, options):
    """An instance of backend class `cls`, given the load options it declares."""
    return cls(**{name: value for name, value in (options or {}).items() if name in cls.options})


def _best_for_device(device, gpu_layers=None):
    classes = backend_classes()
    reasons = []
    for name, _score, usable, reason in describe_backends(device):
        if usable:
            return classes[name]
        reasons.append(f"{name}: {reason}")
    if device == "gpu":
        why = "; ".join(reasons) if reasons else "no GPU backend is installed (pip install 'zephyr[cuda12]')"
        raise BackendError(f"gpu_layers={gpu_layers} asks for a GPU, but no GPU backend is usable: {why}. "
                           f"Use gpu_layers=0 to run on the CPU.")
    return best_backend_class()
