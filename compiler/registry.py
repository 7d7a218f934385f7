"""The registry: every pass, target, model source, data source and runner, with the plugin that provided it.

Built by calling each hook implementation separately, so that a plugin whose hook raises
or returns the wrong thing is named in the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from .errors import PluginError
from .pass_api import Pass
from .sources import DataSource, ModelSource
from .targets import TargetProfile


@dataclass
class Registry:
    """Name -> object maps, plus ``origin[(category, name)]`` = the providing plugin's name."""

    passes: dict[str, Pass] = field(default_factory=dict)
    targets: dict[str, TargetProfile] = field(default_factory=dict)
    model_sources: dict[str, ModelSource] = field(default_factory=dict)
    data_sources: dict[str, DataSource] = field(default_factory=dict)
    runners: dict[str, Any] = field(default_factory=dict)
    origin: dict[tuple[str, str], str] = field(default_factory=dict)
    plugins: dict[str, str | None] = field(default_factory=dict)

    def plugin_of(self, category: str, name: str) -> str:
        return self.origin.get((category, name), "?")


def _add(reg: Registry, category: str, table: dict[str, Any], name: str, obj: Any, plugin: str) -> None:
    if name in table:
        other = reg.origin[(category, name)]
        raise PluginError(
            f"{category[:-1]} '{name}' is registered by both plugin '{other}' and plugin '{plugin}'"
        )
    table[name] = obj
    reg.origin[(category, name)] = plugin


def _check_pass(obj: Any, plugin: str) -> Pass:
    inst = obj() if isinstance(obj, type) else obj
    if not isinstance(inst, Pass):
        raise PluginError(f"plugin '{plugin}': accelc_register_passes returned {obj!r}, not an accelc Pass")
    for attr in ("name", "produces"):
        if not isinstance(getattr(inst, attr, None), str):
            raise PluginError(f"plugin '{plugin}': pass {type(inst).__name__} has no '{attr}' string")
    try:
        Draft202012Validator.check_schema(inst.options_schema)
    except SchemaError as e:
        raise PluginError(
            f"plugin '{plugin}': pass '{inst.name}' publishes an invalid options schema: {e.message}"
        ) from e
    return inst


def build_registry(pm: Any) -> Registry:
    """Call every hook implementation and collect what it provides.

    Raises:
        PluginError: naming the plugin whose hook raised, returned the wrong type, or
            registered a name another plugin already uses.
    """
    reg = Registry()
    for plugin, dist in pm.list_plugin_distinfo():
        reg.plugins[pm.get_name(plugin)] = f"{dist.project_name} {dist.version}"
    for plugin in pm.get_plugins():
        reg.plugins.setdefault(pm.get_name(plugin), None)

    def results(hook_name: str) -> list[tuple[str, Any]]:
        out = []
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name
            try:
                value = impl.function()
            except Exception as e:
                raise PluginError(
                    f"plugin '{plugin}': hook {hook_name} raised {type(e).__name__}: {e}"
                ) from e
            if value is not None:
                out.append((plugin, value))
        return out

    for plugin, items in results("accelc_register_passes"):
        for obj in items:
            p = _check_pass(obj, plugin)
            _add(reg, "passes", reg.passes, p.name, p, plugin)
    for plugin, items in results("accelc_register_targets"):
        for t in items:
            if not isinstance(t, TargetProfile):
                raise PluginError(
                    f"plugin '{plugin}': accelc_register_targets returned {t!r}, not a TargetProfile"
                )
            _add(reg, "targets", reg.targets, t.name, t, plugin)
    for hook, table, base, cat in (
        ("accelc_register_model_sources", reg.model_sources, ModelSource, "model_sources"),
        ("accelc_register_data_sources", reg.data_sources, DataSource, "data_sources"),
    ):
        for plugin, items in results(hook):
            for obj in items:
                inst = obj() if isinstance(obj, type) else obj
                if not isinstance(inst, base):
                    raise PluginError(f"plugin '{plugin}': {hook} returned {obj!r}, not a {base.__name__}")
                _add(reg, cat, table, inst.name, inst, plugin)
    for plugin, mapping in results("accelc_register_runners"):
        if not isinstance(mapping, dict):
            raise PluginError(
                f"plugin '{plugin}': accelc_register_runners must return a dict, got {mapping!r}"
            )
        for kind, factory in mapping.items():
            _add(reg, "runners", reg.runners, kind, factory, plugin)
    return reg


@cache
def default_registry() -> Registry:
    """The process-wide registry: built-in plugins plus installed ``accelc.plugins`` entry points."""
    from accelc.plugins.manager import make_plugin_manager

    return build_registry(make_plugin_manager())
