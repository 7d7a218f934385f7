"""The plugin manager: built-in plugins first, then the ``accelc.plugins`` entry points, then a
check that every hook a plugin implements is one accelc calls.

Environment (read when the manager is made):

* ``ACCELC_PLUGINS``: comma-separated entry-point names; only these installed plugins are loaded
  (built-in plugins always are, unless disabled). Unset or empty: every installed plugin.
* ``ACCELC_DISABLE_PLUGINS``: comma-separated plugin names not to load: entry-point names, or
  the module names of built-in plugins (``accelc.plugins.openvino``).
"""

from __future__ import annotations

import importlib
import os

import pluggy

from accelc.errors import PluginError

from . import hookspecs

ENTRY_POINT_GROUP = "accelc.plugins"
#: Built-in plugin modules, registered like any third-party plugin (datasette's DEFAULT_PLUGINS).
BUILTIN_PLUGINS = (
    "accelc.plugins.generic",
    "accelc.plugins.onnxruntime",
    "accelc.plugins.openvino",
    "accelc.plugins.tensorrt",
    "accelc.plugins.torch",
    "accelc.plugins.gpu_runtimes",
    "accelc.plugins.transformers",
    "accelc.plugins.targets",
)


def _names(var: str) -> list[str]:
    return [n.strip() for n in os.environ.get(var, "").split(",") if n.strip()]


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with accelc's hook specs, the built-in plugins and (optionally) installed
    plugins, chosen by ``ACCELC_PLUGINS`` / ``ACCELC_DISABLE_PLUGINS``.

    Raises:
        PluginError: an entry point's import failed (naming it), a name in ``ACCELC_PLUGINS``
            matches no installed plugin, or a plugin implements a hook accelc does not have
            (a misspelt hook name: the message names the plugin and the hook).
    """
    pm = pluggy.PluginManager("accelc")
    pm.add_hookspecs(hookspecs)
    disabled = _names("ACCELC_DISABLE_PLUGINS")
    for name in disabled:
        pm.set_blocked(name)
    for name in BUILTIN_PLUGINS:
        if name not in disabled:
            pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        wanted = _names("ACCELC_PLUGINS")
        try:
            if wanted:
                for name in wanted:
                    if pm.is_blocked(name):
                        continue
                    if pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name) == 0:
                        raise PluginError(
                            f"ACCELC_PLUGINS names '{name}', but no installed plugin has that entry point "
                            f"in group '{ENTRY_POINT_GROUP}'"
                        )
            else:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except PluginError:
            raise
        except Exception as e:  # an entry point's import can raise anything
            raise PluginError(f"loading plugins from entry-point group '{ENTRY_POINT_GROUP}' failed: {e!r}") from e
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(
            f"plugin '{pm.get_name(e.plugin)}': {e} (accelc's hooks: "
            f"{', '.join(sorted(n for n in dir(hookspecs) if n.startswith('accelc_')))})"
        ) from e
    return pm
