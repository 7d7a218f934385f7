"""The plugin manager: built-in plugins first, then every ``accelc.plugins`` entry point."""

from __future__ import annotations

import importlib

import pluggy

from accelc.errors import PluginError

from . import hookspecs

ENTRY_POINT_GROUP = "accelc.plugins"
#: Built-in plugin modules, registered like any third-party plugin (datasette's DEFAULT_PLUGINS).
BUILTIN_PLUGINS = ("accelc.plugins.builtin", "accelc.plugins.targets", "accelc.plugins.gpu_runtimes")


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with accelc's hook specs, the built-in plugins and (optionally) installed plugins.

    Raises:
        PluginError: naming the entry point whose import failed.
    """
    pm = pluggy.PluginManager("accelc")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as e:  # an entry point's import can raise anything
            raise PluginError(f"loading plugins from entry-point group '{ENTRY_POINT_GROUP}' failed: {e!r}") from e
    return pm
