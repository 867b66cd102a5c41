"""Finding backends: the plugin manager, entry-point discovery, and selection by name or score.

Built-in backends are plugins too: they are declared under the same entry-point group
(`zephyr.backends`) in pyproject.toml as any third-party package's.
"""
import threading
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .backend import BACKEND_API_VERSION, Backend
from .errors import BackendError

ENTRY_POINT_GROUP = "zephyr.backends"

_manager = None
_lock = threading.Lock()
# Entry points that failed to import: name -> why. A broken plugin must not take the others down.
broken_plugins = {}


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every installed plugin loaded (once, on first use)."""
    global _manager
    with _lock:
        if _manager is None:
            manager = pluggy.PluginManager(hookspecs.PROJECT)
            manager.add_hookspecs(hookspecs)
            for entry_point in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    manager.register(entry_point.load(), name=entry_point.name)
                except Exception as exc:  # noqa: BLE001 - reported by `zephyr backends`
                    broken_plugins[entry_point.name] = f"plugin {entry_point.value!r} failed to load: {exc!r}"
            _manager = manager
        return _manager


def register_plugin(plugin, name=None):
    """Register a plugin object or module by hand (for apps and tests; packages use entry points)."""
    plugin_manager().register(plugin, name=name)


def unregister_plugin(plugin=None, name=None):
    plugin_manager().unregister(plugin, name=name)


def backend_classes() -> dict:
    """Every registered backend class by name, whatever its interface version or availability.
    Two plugins offering different backends of one name is an error naming both."""
    found, offered_by = {}, {}
    for impl in plugin_manager().hook.zephyr_register_backends.get_hookimpls():   # in registration order
        plugin = getattr(impl.plugin, "__name__", type(impl.plugin).__name__)     # a module, or an object's class
        for cls in impl.function() or ():
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                raise BackendError(f"plugin {plugin!r} returned {cls!r}, which is not a zephyr.backend.Backend subclass")
            if cls.name in found and found[cls.name] is not cls:
                raise BackendError(f"two plugins offer a backend named {cls.name!r}: {offered_by[cls.name]!r} "
                                   f"and {plugin!r}; uninstall one of them")
            found[cls.name], offered_by[cls.name] = cls, plugin
    return found


def check_compatible(cls):
    """Raise BackendError if `cls` was built for another version of the backend interface."""
    if cls.api_version != BACKEND_API_VERSION:
        raise BackendError(
            f"backend {cls.name!r} implements backend interface version {cls.api_version}, but this "
            f"zephyr speaks version {BACKEND_API_VERSION}; upgrade the package that provides it (or zephyr)")


def describe_backends(device=None) -> list:
    """(name, score, usable, reason) for every installed backend, best first: what `zephyr backends` shows.
    Plugins that failed to load are listed too, unusable, with the error. With `device` ("cpu" or
    "gpu"), only that device's backends, and only they are probed (a GPU backend's probe imports
    CuPy: ~15 MB of memory that a CPU-only run should not pay)."""
    rows = []
    for name, cls in backend_classes().items():
        if device is not None and cls.device != device:
            continue
        try:
            check_compatible(cls)
            status = cls.availability()
            usable, reason = status.available, status.reason
        except Exception as exc:  # a broken plugin must not hide the others
            usable, reason = False, str(exc)
        rows.append((name, cls.score, usable, reason))
    if device is None:
        rows += [(name, 0, False, why) for name, why in broken_plugins.items()]
    return sorted(rows, key=lambda row: (-row[1], row[0]))


def get_backend_class(name: str):
    """The usable backend class called `name`, or a BackendError saying why it cannot be used."""
    classes = backend_classes()
    if name not in classes:
        if name in broken_plugins:
            raise BackendError(broken_plugins[name])
        known = ", ".join(sorted(classes)) or "none"
        raise BackendError(f"no backend named {name!r} is installed (installed: {known})")
    cls = classes[name]
    check_compatible(cls)
    status = cls.availability()
    if not status:
        raise BackendError(f"backend {name!r} is installed but unavailable here: {status.reason}")
    return cls


def best_backend_class(exclude=()):
    """The usable backend with the highest score (ties broken by name)."""
    for name, _score, usable, _reason in describe_backends():
        if usable and name not in exclude:
            return backend_classes()[name]
    raise BackendError("no usable backend is installed; reinstall zephyr (the CPU backend ships with it)")
