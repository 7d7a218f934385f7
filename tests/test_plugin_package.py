"""A third-party plugin, installed with pip from its own package, is listed and runs in a build
with no change to accelc's code (entry-point group ``accelc.plugins``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import pip_install_target, write_tiny_recipe

PKG = Path(__file__).parent / "plugin_pkg"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    site = pip_install_target(PKG, tmp_path_factory.mktemp("site"))
    assert any(p.name.startswith("accelc_example_plugin-0.3.0") for p in site.iterdir())
    return site


def accelc(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "accelc.cli", *args], env=env, cwd=cwd, capture_output=True, text=True
    )


def test_installed_plugin_pass_is_listed(plugin_site, tmp_path):
    r = accelc(["passes"], plugin_site, tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "strip_doc_strings" in ln)
    assert "example" in line  # the plugin's entry-point name
    r = accelc(["plugins"], plugin_site, tmp_path)
    assert "accelc-example-plugin 0.3.0" in r.stdout


def test_installed_plugin_pass_runs_in_a_build(plugin_site, tmp_path):
    recipe = write_tiny_recipe(
        tmp_path,
        passes=["export_onnx", "strip_doc_strings", "calibrate", "quantize"],
        benchmark={"enabled": False},
    )
    r = accelc(["build", str(recipe), "--out", "out", "--cache-dir", "cache"], plugin_site, tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    st = next(s for s in rep["stages"] if s["pass"] == "strip_doc_strings")
    assert st["status"] == "ok" and not st["cached"] and st["metrics"]["nodes"] > 0
    assert st["artifact"]["kind"] == "onnx"
    quant = next(s for s in rep["stages"] if s["pass"] == "calibrate")
    assert quant["status"] == "ok"


def test_without_the_plugin_the_recipe_is_rejected(tmp_path):
    recipe = write_tiny_recipe(tmp_path, passes=["export_onnx", "strip_doc_strings"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-m", "accelc.cli", "validate", str(recipe)], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and "unknown pass 'strip_doc_strings'" in r.stderr
