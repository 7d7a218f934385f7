"""End-to-end builds of the shipped recipes on the real model and real photographs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from builders import REPO

pytestmark = pytest.mark.e2e


def accelc(args, cwd, cache):
    env = {**os.environ, "ACCELC_CACHE_DIR": str(cache), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "accelc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_default_recipe_cold_then_warm(tmp_path):
    recipe = REPO / "recipes" / "efficientnet_lite0_cpu_int8.yaml"
    cold = accelc(["build", str(recipe), "--out", "out"], tmp_path, tmp_path / "cache")
    assert cold.returncode == 0, cold.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["status"] == "ok" and rep["final_artifact"] == "model.onnx"
    assert (tmp_path / "out" / "model.onnx").is_file()
    stages = {s["node"]: s for s in rep["stages"]}
    assert not any(s["cached"] for s in rep["stages"])
    q = stages["verify[quantize]"]["metrics"]
    assert q["samples"] >= 90
    bench = stages["benchmark"]["metrics"]["batch"]["1"]
    assert bench["p50_ms"] > 0

    warm = accelc(["build", str(recipe), "--out", "out2"], tmp_path, tmp_path / "cache")
    assert warm.returncode == 0, warm.stderr
    rep2 = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert all(s["cached"] for s in rep2["stages"])
    assert rep2["final_digest"] == rep["final_digest"]
    assert (tmp_path / "out2" / "model.onnx").read_bytes() == (tmp_path / "out" / "model.onnx").read_bytes()


def test_t4_recipe_on_a_host_without_gpu_stops_at_trt_engine(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA GPU; the test covers hosts without one")
    recipe = REPO / "recipes" / "resnet18_t4_int8.yaml"
    r = accelc(["build", str(recipe), "--out", "out"], tmp_path, tmp_path / "cache")
    assert r.returncode == 3, r.stderr
    assert "trt_engine" in r.stderr and "cuda" in r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    done = [s["node"] for s in rep["stages"] if s["status"] == "ok"]
    assert "quantize" in done and "verify[quantize]" in done
    assert rep["stages"][-1]["node"] == "trt_engine" and rep["stages"][-1]["status"] == "blocked"
    # every pass it could run is cached: a second run reuses them all and stops at the same place
    again = accelc(["build", str(recipe), "--out", "out"], tmp_path, tmp_path / "cache")
    assert again.returncode == 3
    rep2 = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(s["cached"] for s in rep2["stages"] if s["status"] == "ok")
