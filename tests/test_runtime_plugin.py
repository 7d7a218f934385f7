"""A target with a new runtime is a pip-installed plugin: ``tests/runtime_plugin_pkg`` adds the
``cpu-seq`` target, the ``ort-sequential`` runtime, its artifact kind and a host capability, and a
tiny recipe on it validates, plans, builds, verifies and benchmarks through the ordinary passes;
the accuracy search's trials run on the plugin's session factory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import pip_install_target, write_tiny_recipe

PKG = Path(__file__).parent / "runtime_plugin_pkg"


@pytest.fixture(scope="module")
def runtime_site(tmp_path_factory) -> Path:
    site = pip_install_target(PKG, tmp_path_factory.mktemp("rt-site"))
    return site


def accelc(args: list[str], site: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "250", **env}
    return subprocess.run(
        [sys.executable, "-m", "accelc.cli", *args], env=full, cwd=cwd, capture_output=True, text=True
    )


def test_new_runtime_target_validates_plans_builds_verifies_and_benchmarks(runtime_site, tmp_path):
    recipe = write_tiny_recipe(
        tmp_path,
        target="cpu-seq",
        precision="int8",
        passes=[
            "export_onnx",
            "onnxsim",
            {"calibrate": {"method": "auto", "candidates": ["minmax", "percentile"]}},
            "quantize",
            "ort_basic_optimize",
        ],
        verify={"after": ["ort_basic_optimize"], "tolerances": {"cosine": 0.5}},
        benchmark={"batch_sizes": [1], "warmup": 1, "iterations": 3},
    )
    r = accelc(["validate", str(recipe)], runtime_site, tmp_path)
    assert r.returncode == 0, r.stderr
    r = accelc(["plan", str(recipe), "--cache-dir", "cache"], runtime_site, tmp_path)
    assert r.returncode == 0, r.stderr and "ort_basic_optimize" in r.stdout
    r = accelc(["build", str(recipe), "--out", "out", "--cache-dir", "cache"], runtime_site, tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["runtime"] == "ort-sequential" and rep["final_kind"] == "onnx.ort_basic"
    stages = {s["node"]: s for s in rep["stages"]}
    assert stages["verify[ort_basic_optimize]"]["metrics"]["stage_kind"] == "onnx.ort_basic"
    assert stages["benchmark"]["metrics"]["artifact_kind"] == "onnx.ort_basic"
    assert stages["benchmark"]["metrics"]["batch"]["1"]["p50_ms"] > 0
    # lowering handed the trials the recipe's runtime, because the plugin's runtime has a session factory
    assert stages["calibrate"]["metrics"]["runtime"] == "ort-sequential"
    # the capability is the plugin's: the plan would say why a host without it cannot build
    r = accelc(["plugins"], runtime_site, tmp_path)
    line = " ".join(r.stdout.split())
    assert "accelc-ort-sequential 0.1.0" in line and "ort_sequential" in line and "register_runtimes" in line


def test_disabling_the_plugin_removes_its_target(runtime_site, tmp_path):
    recipe = write_tiny_recipe(tmp_path, target="cpu-seq", precision="fp32")
    r = accelc(["validate", str(recipe)], runtime_site, tmp_path, ACCELC_DISABLE_PLUGINS="ort_sequential")
    assert r.returncode == 2 and "cpu-seq" in r.stderr
    r = accelc(["validate", str(recipe)], runtime_site, tmp_path, ACCELC_PLUGINS="ort_sequential")
    assert r.returncode == 0, r.stderr
