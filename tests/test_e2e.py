"""End-to-end builds of the shipped recipes on the real model and real photographs.

The default recipe is built once per module (cold, through the CLI); the tests below read
that build and then rebuild warm from the same cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from builders import REPO

pytestmark = pytest.mark.e2e
DEFAULT = REPO / "recipes" / "efficientnet_lite0_cpu_int8.yaml"


def accelc(args, cwd, cache):
    env = {**os.environ, "ACCELC_CACHE_DIR": str(cache), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "accelc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def default_build(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("default")
    cold = accelc(["build", str(DEFAULT), "--out", "out"], tmp, tmp / "cache")
    assert cold.returncode == 0, cold.stderr
    return tmp, json.loads((tmp / "out" / "report.json").read_text())


def stage(report: dict, node: str) -> dict:
    return next(s for s in report["stages"] if s["node"] == node)


def test_default_recipe_cold_build(default_build):
    tmp, rep = default_build
    assert rep["status"] == "ok" and rep["final_artifact"] == "model.onnx"
    assert (tmp / "out" / "model.onnx").is_file()
    assert not any(s["cached"] for s in rep["stages"])
    assert stage(rep, "verify[quantize]")["metrics"]["samples"] >= 90
    assert stage(rep, "verify[onnxsim]")["metrics"]["top1_agreement"] == 1.0
    assert stage(rep, "benchmark")["metrics"]["batch"]["1"]["p50_ms"] > 0


def test_default_recipe_keeps_its_tolerance_with_few_nodes_in_float(default_build):
    """Accuracy-aware INT8 on the real model: every calibration method was tried, the nodes kept in
    float are the most sensitive ones and no more than allowed, and verification meets the recipe."""
    _, rep = default_build
    raw = yaml.safe_load(DEFAULT.read_text())
    tol = {**raw["verify"]["tolerances"], **raw["verify"].get("stages", {}).get("quantize", {})}
    cal = stage(rep, "calibrate")["metrics"]
    assert {t["method"] for t in cal["trials"]} == {"minmax", "entropy", "percentile"}
    q = stage(rep, "quantize")["metrics"]
    quantize_opts = next(p["quantize"] for p in raw["passes"] if isinstance(p, dict) and "quantize" in p)
    assert len(q["fp32_nodes"]) <= quantize_opts["max_fp32_nodes"]
    assert q["sensitivity"] and q["fp32_nodes"] == [r["node"] for r in q["sensitivity"][: len(q["fp32_nodes"])]]
    v = stage(rep, "verify[quantize]")["metrics"]
    assert v["top1_agreement"] >= tol["top1_agreement"] and v["cosine"] >= tol["cosine"]
    assert v["flip_margin"] <= tol["flip_margin"]  # no crop flips where the FP32 model was confident


def test_default_recipe_warm_rebuild_reruns_nothing(default_build):
    tmp, rep = default_build
    warm = accelc(["build", str(DEFAULT), "--out", "out2"], tmp, tmp / "cache")
    assert warm.returncode == 0, warm.stderr
    rep2 = json.loads((tmp / "out2" / "report.json").read_text())
    assert all(s["cached"] for s in rep2["stages"])
    assert rep2["final_digest"] == rep["final_digest"]
    assert (tmp / "out2" / "model.onnx").read_bytes() == (tmp / "out" / "model.onnx").read_bytes()


def test_t4_recipe_on_a_host_without_gpu_stops_at_trt_engine(tmp_path):
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


def test_resnet18_openvino_recipe_builds_an_int8_ir_scored_on_openvino(tmp_path):
    """The OpenVINO pipeline on a real torchvision model and real photographs, through the CLI:
    every compute layer of the IR runs an INT8 kernel, verification and the benchmark run the IR
    on OpenVINO, and the out dir names the IR's .xml as the artifact."""
    recipe = REPO / "recipes" / "resnet18_cpu_openvino_int8.yaml"
    r = accelc(["build", str(recipe), "--out", "out"], tmp_path, tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["final_kind"] == "openvino.ir" and rep["final_artifact"] == "model.xml"
    assert (tmp_path / "out" / "model.bin").is_file()
    assert stage(rep, "quantize")["metrics"]["quantize_linear_nodes"] > 0
    layers = stage(rep, "openvino_ir")["metrics"]["layers"]
    assert set(layers) <= {"u8", "i8"} and sum(layers.values()) == 21, layers  # 20 convolutions + the FC layer
    cosine = yaml.safe_load(recipe.read_text())["verify"]["tolerances"]["cosine"]
    assert stage(rep, "verify[openvino_ir]")["metrics"]["cosine"] >= cosine
    assert stage(rep, "benchmark")["metrics"]["artifact_kind"] == "openvino.ir"


def test_minilm_recipe_builds_dynamic_int8_that_keeps_the_neighbours(tmp_path):
    """The real all-MiniLM-L6-v2 and real held-out sentences: dynamic INT8 with outlier channels
    split off meets the recipe's cosine and recall@5 tolerances, and the report says how."""
    recipe = REPO / "recipes" / "minilm_cpu_int8.yaml"
    res = accelc(["build", str(recipe), "--out", "out"], tmp_path, tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    q = stage(rep, "quantize_dynamic")["metrics"]
    oc = q["outlier_channels"]
    assert oc["decomposed"] > 0 and oc["samples"] == 400 and oc["threshold"] == 3
    assert len(q["fp32_nodes"]) <= 12 and "MatMulInteger" in q["quantized"]
    v = stage(rep, "verify[quantize_dynamic]")["metrics"]
    assert v["samples"] == 256 and v["cosine"] >= 0.99 and v["neighbor_recall"] >= 0.95
    b = stage(rep, "benchmark")["metrics"]
    assert set(b["batch_sequence"]) >= {"1x32", "1x128", "8x32", "8x128"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Outlier channels (in every trial)" in md and "neighbour recall" in md
