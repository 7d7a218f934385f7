"""The registry: every pass, target, runtime, artifact kind, host capability, model source, data source
and runner, with the plugin that provided it.

Built by calling each hook implementation separately, so that a plugin whose hook raises
or returns the wrong thing is named in the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from .artifacts import ArtifactKind
from .errors import PluginError
from .pass_api import Pass
from .runners import Runtime
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
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    kinds: dict[str, ArtifactKind] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)
    origin: dict[tuple[str, str], str] = field(default_factory=dict)
    plugins: dict[str, str | None] = field(default_factory=dict)
    #: plugin name -> the hooks it implements
    hooks: dict[str, list[str]] = field(default_factory=dict)
    pm: Any = None

    def report_sections(self, report: dict[str, Any], stages: list[Any]) -> dict[str, Any]:
        """Every plugin's ``accelc_report_sections`` for this report, merged.

        Raises:
            PluginError: a plugin's hook raised or returned something other than a dict, or two
                plugins returned the same section name.
        """
        out: dict[str, Any] = {}
        owner: dict[str, str] = {}
        if self.pm is None:
            return out
        for impl in self.pm.hook.accelc_report_sections.get_hookimpls():
            plugin = impl.plugin_name
            try:
                value = impl.function(report=report, stages=stages)
            except Exception as e:
                raise PluginError(
                    f"plugin '{plugin}': hook accelc_report_sections raised {type(e).__name__}: {e}"
                ) from e
            if value is None:
                continue
            if not isinstance(value, dict):
                raise PluginError(f"plugin '{plugin}': accelc_report_sections must return a dict, got {value!r}")
            for name, section in value.items():
                if name in owner:
                    raise PluginError(
                        f"report section '{name}' is returned by both plugin '{owner[name]}' and plugin '{plugin}'"
                    )
                owner[name] = plugin
                out[name] = section
        return out

    def plugin_of(self, category: str, name: str) -> str:
        return self.origin.get((category, name), "?")


_SINGULAR = {"passes": "pass", "capabilities": "host capability", "kinds": "artifact kind"}


def _add(reg: Registry, category: str, table: dict[str, Any], name: str, obj: Any, plugin: str) -> None:
    if name in table:
        other = reg.origin[(category, name)]
        raise PluginError(
            f"{_SINGULAR.get(category, category[:-1])} '{name}' is registered by both plugin '{other}' "
            f"and plugin '{plugin}'"
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
    reg = Registry(pm=pm)
    for plugin, dist in pm.list_plugin_distinfo():
        reg.plugins[pm.get_name(plugin)] = f"{dist.project_name} {dist.version}"
    for plugin in pm.get_plugins():
        reg.plugins.setdefault(pm.get_name(plugin), None)
    for hook_name in dir(pm.hook):
        if hook_name.startswith("accelc_"):
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                reg.hooks.setdefault(impl.plugin_name, []).append(hook_name)

    def results(hook_name: str) -> list[tuple[str, Any]]:
        out = []
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name
            try:
                value = impl.function()
            except Exception as e:
                raise PluginError(f"plugin '{plugin}': hook {hook_name} raised {type(e).__name__}: {e}") from e
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
                raise PluginError(f"plugin '{plugin}': accelc_register_targets returned {t!r}, not a TargetProfile")
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
            raise PluginError(f"plugin '{plugin}': accelc_register_runners must return a dict, got {mapping!r}")
        for kind, factory in mapping.items():
            _add(reg, "runners", reg.runners, kind, factory, plugin)
    for plugin, items in results("accelc_register_runtimes"):
        for rt in items:
            if not isinstance(rt, Runtime):
                raise PluginError(f"plugin '{plugin}': accelc_register_runtimes returned {rt!r}, not a Runtime")
            _add(reg, "runtimes", reg.runtimes, rt.name, rt, plugin)
            if rt.runner is not None:
                for kind in rt.kinds:
                    _add(reg, "runners", reg.runners, kind, rt.runner, plugin)
    for plugin, items in results("accelc_register_artifact_kinds"):
        for k in items:
            if not isinstance(k, ArtifactKind):
                raise PluginError(
                    f"plugin '{plugin}': accelc_register_artifact_kinds returned {k!r}, not an ArtifactKind"
                )
            _add(reg, "kinds", reg.kinds, k.name, k, plugin)
    for plugin, mapping in results("accelc_register_host_capabilities"):
        if not isinstance(mapping, dict) or not all(callable(v) for v in mapping.values()):
            raise PluginError(
                f"plugin '{plugin}': accelc_register_host_capabilities must return {{name: probe}}, got {mapping!r}"
            )
        for name, probe in mapping.items():
            _add(reg, "capabilities", reg.capabilities, name, probe, plugin)
    return reg


@cache
def default_registry() -> Registry:
    """The process-wide registry: built-in plugins plus installed ``accelc.plugins`` entry points."""
    from accelc.plugins.manager import make_plugin_manager

    return build_registry(make_plugin_manager())
