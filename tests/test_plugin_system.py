"""The plugin system's contracts: the core imports no backend, a misspelt hook is an error naming it,
plugins can be chosen by environment, tolerances are defined once."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from accelc.errors import PluginError
from accelc.plugins import hookimpl

BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch", "accelc.passes", "accelc.plugins")


def test_the_core_imports_no_backend_and_no_pass_module():
    code = (
        "import json, sys, importlib\n"
        "for m in ['accelc', 'accelc.artifacts', 'accelc.build', 'accelc.cache', 'accelc.cli', 'accelc.executor',"
        " 'accelc.graph', 'accelc.host', 'accelc.pass_api', 'accelc.recipe', 'accelc.registry', 'accelc.report',"
        " 'accelc.runners', 'accelc.runtime', 'accelc.targets', 'accelc.tolerances', 'accelc.sources.data',"
        " 'accelc.sources.models']:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(r.stdout.splitlines()[-1])
    bad = [m for m in loaded if any(m == b or m.startswith(b + ".") for b in BACKENDS)]
    assert bad == []


def test_a_misspelt_hook_is_an_error_naming_plugin_and_hook(monkeypatch):
    from accelc.plugins import manager

    plugin = types.ModuleType("typo_plugin")

    @hookimpl
    def accelc_register_pases():  # misspelt on purpose
        return []

    plugin.accelc_register_pases = accelc_register_pases
    real = manager.pluggy.PluginManager.load_setuptools_entrypoints

    def load(self, group, name=None):
        self.register(plugin, name="typo")
        return 1

    monkeypatch.setattr(manager.pluggy.PluginManager, "load_setuptools_entrypoints", load)
    with pytest.raises(PluginError, match=r"plugin 'typo'.*accelc_register_pases"):
        manager.make_plugin_manager()
    monkeypatch.setattr(manager.pluggy.PluginManager, "load_setuptools_entrypoints", real)


def test_disabled_builtin_plugin_takes_its_runtime_away(monkeypatch):
    from accelc.plugins.manager import make_plugin_manager
    from accelc.registry import build_registry

    monkeypatch.setenv("ACCELC_DISABLE_PLUGINS", "accelc.plugins.openvino")
    reg = build_registry(make_plugin_manager(load_entry_points=False))
    assert "openvino" not in reg.runtimes and "openvino_ir" not in reg.passes and "onnxruntime" in reg.runtimes


def test_unknown_plugin_in_accelc_plugins_is_named(monkeypatch):
    from accelc.plugins.manager import make_plugin_manager

    monkeypatch.setenv("ACCELC_PLUGINS", "no_such_plugin")
    with pytest.raises(PluginError, match="no_such_plugin"):
        make_plugin_manager()


def test_recipe_schema_tolerances_are_the_one_definition():
    from accelc.schemas_loader import recipe_schema
    from accelc.tolerances import TOLERANCES_SCHEMA

    assert recipe_schema()["$defs"]["tolerances"] == TOLERANCES_SCHEMA


def test_every_builtin_runtime_named_by_a_target_is_registered():
    from accelc.registry import default_registry

    reg = default_registry()
    named = {rt for t in reg.targets.values() for rt in t.runtimes}
    assert named <= set(reg.runtimes)


def test_quantize_leaves_the_root_logger_alone(tmp_path):
    import logging

    from test_bias_correction import float_model, samples, table

    from accelc.passes.quantizer import quantize_model

    fp = float_model(tmp_path / "fp.onnx")
    cal = samples(0)
    tab = table(fp, cal, tmp_path)
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        quantize_model(fp, tab, tmp_path / "q.onnx", {}, calibration=cal)
        assert root.level == logging.INFO
    finally:
        root.setLevel(before)
