"""Backend plugins: entry-point discovery, version checks, availability, selection."""
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from zephyr import hookspecs
from zephyr.backend import BACKEND_API_VERSION, Availability
from zephyr.errors import BackendError
from zephyr.hookspecs import hookimpl
from zephyr.placement import plan_placement
from zephyr.plugins import (ENTRY_POINT_GROUP, backend_classes, best_backend_class, describe_backends,
                            get_backend_class, register_plugin, unregister_plugin)
from zephyr_backends.reference.backend import ReferenceBackend


def test_builtin_backends_come_through_the_public_entry_point():
    names = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert names["cpu"] == "zephyr_backends.cpu" and names["reference"] == "zephyr_backends.reference"
    assert {"cpu", "reference"} <= set(backend_classes())


def test_best_backend_is_the_cpu_backend_here():
    assert best_backend_class().name == "cpu"
    rows = {name: (usable, reason) for name, _, usable, reason in describe_backends()}
    assert rows["cpu"] == (True, "") and rows["reference"] == (True, "")


class _Plugin:
    """A third-party plugin registered by hand, as an app embedding zephyr might."""

    def __init__(self, *classes):
        self.classes = list(classes)

    @hookimpl
    def zephyr_register_backends(self):
        return self.classes


@pytest.fixture
def plugin():
    registered = []

    def register(*classes):
        p = _Plugin(*classes)
        register_plugin(p)
        registered.append(p)
        return p
    yield register
    for p in registered:
        unregister_plugin(p)


def test_a_backend_for_another_interface_version_is_refused(plugin):
    class Future(ReferenceBackend):
        name = "future"
        api_version = BACKEND_API_VERSION + 1
    plugin(Future)
    with pytest.raises(BackendError, match=rf"version {BACKEND_API_VERSION + 1}.*version {BACKEND_API_VERSION}"):
        get_backend_class("future")
    row = next(r for r in describe_backends() if r[0] == "future")
    assert row[2] is False and f"version {BACKEND_API_VERSION + 1}" in row[3]


def test_unavailable_backend_says_why_and_is_skipped(plugin):
    class Missing(ReferenceBackend):
        name = "missing"
        score = 1000

        @classmethod
        def availability(cls):
            return Availability(False, "needs a FooCard")
    plugin(Missing)
    with pytest.raises(BackendError, match="unavailable here: needs a FooCard"):
        get_backend_class("missing")
    assert best_backend_class().name == "cpu"


def test_higher_score_wins_and_names_select(plugin):
    class Better(ReferenceBackend):
        name = "better"
        score = 50
    plugin(Better)
    assert best_backend_class().name == "better"
    assert get_backend_class("reference") is ReferenceBackend
    with pytest.raises(BackendError, match="no backend named 'nope'.*installed: .*cpu"):
        get_backend_class("nope")


def test_a_cpu_only_placement_does_not_probe_gpu_backends(plugin):
    """Probing a GPU backend can be costly (the CUDA one imports CuPy); gpu_layers=0 needs none."""
    probed = []

    class Gpu(ReferenceBackend):
        name = "probed-gpu"
        device = "gpu"

        @classmethod
        def availability(cls):
            probed.append(cls.name)
            return Availability(True, "")
    plugin(Gpu)
    placement = plan_placement(2, gpu_layers=0)
    assert placement.head.name == "cpu" and probed == []
    assert plan_placement(2, gpu_layers=1).layers[1].name == "probed-gpu" and probed
    gpu_rows = describe_backends("gpu")
    assert "probed-gpu" in [r[0] for r in gpu_rows] and all(backend_classes()[r[0]].device == "gpu" for r in gpu_rows)


def test_a_plugin_returning_junk_is_reported(plugin):
    plugin(object)
    with pytest.raises(BackendError, match="not a zephyr.backend.Backend subclass"):
        backend_classes()


def test_two_plugins_offering_one_name_is_an_error_naming_both(plugin):
    class Impostor(ReferenceBackend):
        name = "cpu"
    plugin(Impostor)
    with pytest.raises(BackendError, match="two plugins offer a backend named 'cpu': 'zephyr_backends.cpu' and '_Plugin'"):
        backend_classes()


def test_one_class_offered_twice_is_one_backend(plugin):
    plugin(ReferenceBackend)
    assert backend_classes()["reference"] is ReferenceBackend


def test_every_hook_is_documented():
    docs = (Path(__file__).parents[1] / "docs" / "backends.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("zephyr_")]
    assert hooks
    for hook in hooks:
        assert re.search(rf"`{hook}\(", docs), f"docs/backends.md does not document {hook}"


def test_a_plugin_that_fails_to_import_does_not_hide_the_others(monkeypatch):
    import zephyr.plugins as plugins
    from importlib.metadata import EntryPoint
    real = plugins.entry_points(group=ENTRY_POINT_GROUP)
    broken = EntryPoint("broken", "no_such_module_for_zephyr", ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: list(real) + [broken])
    monkeypatch.setattr(plugins, "_manager", None)
    monkeypatch.setattr(plugins, "broken_plugins", {})
    assert best_backend_class().name == "cpu"
    row = next(r for r in describe_backends() if r[0] == "broken")
    assert row[2] is False and "no_such_module_for_zephyr" in row[3]
    with pytest.raises(BackendError, match="failed to load"):
        get_backend_class("broken")
