"""The hooks a zephyr plugin may implement (declarations only)."""
import pluggy

PROJECT = "zephyr"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def zephyr_register_backends():
    """Return a list of `zephyr.backend.Backend` subclasses this plugin provides."""
