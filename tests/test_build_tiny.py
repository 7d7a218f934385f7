"""Every CPU pass on a small model built in the test, through the real build pipeline."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from builders import FIXTURES, write_tiny_recipe

from accelc.build import build
from accelc.passes.benchmark import latency_stats
from accelc.passes.fusion import fold_conv_bn
from accelc.passes.verification import compare_outputs, tolerance_failures

sys.path.insert(0, str(FIXTURES))
from tiny_models import TinyConvNet  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    recipe = write_tiny_recipe(tmp)
    cache = tmp / "cache"
    first = build(recipe, out_dir=tmp / "out", cache_dir=cache)
    return tmp, recipe, cache, first


def stage(report, node):
    return next(s for s in report["stages"] if s["node"] == node)


def test_cold_build_runs_every_pass_and_writes_outputs(built):
    tmp, _, _, first = built
    assert first.ok, first.result.failure
    rep = first.report
    assert rep["final_artifact"] == "model.onnx"
    assert all(not s["cached"] for s in rep["stages"])
    out = tmp / "out"
    assert {"model.onnx", "report.json", "report.md", "accelc.lock"} <= {p.name for p in out.iterdir()}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["stages"][0]["pass"] == "load_model" and on_disk["target"] == "cpu"
    lock = json.loads((out / "accelc.lock").read_text())
    assert [n["id"] for n in lock["nodes"]] == [s["node"] for s in rep["stages"]]
    assert lock["environment"]["packages"]["onnxruntime"]
    md = (out / "report.md").read_text()
    assert "verify[quantize]" in md and "p50 ms" in md


def test_fuse_modules_folds_every_bn_including_conv_subclasses(built):
    m = stage(built[3].report, "fuse_modules")["metrics"]
    assert m["folded_conv_bn"] == 2 and m["max_abs_diff"] < 1e-4


def test_quantized_graph_has_qdq_and_is_verified(built):
    tmp = built[0]
    model = onnx.load(str(tmp / "out" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    v = stage(built[3].report, "verify[quantize]")["metrics"]
    assert v["samples"] == 24 and 0.9 <= v["cosine"] <= 1.0 and "accuracy" in v  # val.npz has labels
    exact = stage(built[3].report, "verify[onnxsim]")["metrics"]
    assert exact["top1_agreement"] == 1.0 and exact["max_abs_error"] < 1e-3


def test_benchmark_reports_percentiles_per_batch(built):
    b = stage(built[3].report, "benchmark")["metrics"]
    assert set(b["batch"]) == {"1", "4"} and b["threads"] >= 1
    for stats in b["batch"].values():
        assert 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
        assert stats["throughput"] > 0


def test_warm_build_reruns_nothing_and_gives_the_same_artifact(built):
    tmp, recipe, cache, first = built
    second = build(recipe, out_dir=tmp / "out2", cache_dir=cache)
    assert second.ok
    assert all(s["cached"] for s in second.report["stages"])
    assert second.report["final_digest"] == first.report["final_digest"]


def test_changing_one_option_reruns_that_pass_and_downstream(built):
    tmp, _, cache, _ = built
    # the cpu int8 default pipeline, with one quantize option that no other pass reads changed
    steps = ["fuse_modules", "export_onnx", "onnxsim", {"calibrate": {"method": "auto"}},
             {"quantize": {"fallback": "auto", "max_fp32_nodes": 3}}]
    r = build(write_tiny_recipe(tmp, "b.yaml", passes=steps), out_dir=tmp / "out3", cache_dir=cache)
    assert r.ok
    ran = {s["node"] for s in r.report["stages"] if not s["cached"]}
    assert ran == {"quantize", "verify[quantize]", "benchmark"}


def test_missed_tolerance_fails_with_stage_and_metric(built):
    tmp, _, cache, _ = built
    r = build(
        # plain INT8 (not the accuracy-aware default, which would keep nodes in float until it holds)
        write_tiny_recipe(
            tmp, "strict.yaml", verify={"tolerances": {"cosine": 0.999999999}},
            passes=["fuse_modules", "export_onnx", "onnxsim", "calibrate", "quantize"],
        ),
        out_dir=tmp / "strict",
        cache_dir=cache,
    )
    assert not r.ok
    msg = str(r.result.failure)
    assert "verify[" in msg and "cosine" in msg and "required >= 1" in msg
    # the failure names the recipe options that would help
    assert "calibrate: {method: auto}" in msg and "quantize: {fallback: auto}" in msg
    assert r.report["status"] == "failed" and not (tmp / "strict" / "model.onnx").exists()


def test_fold_conv_bn_equals_original():
    torch.manual_seed(0)
    m = TinyConvNet().eval()
    fused, n = fold_conv_bn(m)
    x = torch.randn(2, 3, 32, 32)
    assert n == 2
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fused.modules())
    torch.testing.assert_close(fused(x), m(x), atol=1e-5, rtol=1e-5)


def test_compare_outputs_metrics():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]])
    out = np.array([[1.0, 0.1], [0.2, 0.1], [1.0, 2.0]])
    m = compare_outputs(ref, out, labels=np.array([0, 1, 0]))
    assert m["top1_agreement"] == pytest.approx(2 / 3)
    assert m["max_abs_error"] == pytest.approx(0.9)
    assert m["reference_accuracy"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(1 / 3)
    assert m["accuracy_drop"] == pytest.approx(1 / 3)
    assert tolerance_failures(m, {"top1_agreement": 0.9, "max_abs_error": 1.0}) == [
        "top1_agreement = 0.666667, required >= 0.9"
    ]


def test_flip_margin_is_the_largest_reference_margin_among_flipped_samples():
    ref = np.array([[3.0, 0.5, 0.0], [1.0, 0.9, 0.0], [0.0, 2.0, 0.2], [5.0, 1.0, 0.0]])
    out = np.array([[3.0, 0.5, 0.0], [0.9, 1.0, 0.0], [0.0, 0.1, 0.2], [5.0, 1.0, 0.0]])
    m = compare_outputs(ref, out)  # rows 1 (margin 0.1) and 2 (margin 1.8) flip
    assert m["top1_agreement"] == pytest.approx(0.5)
    assert m["flip_margin"] == pytest.approx(1.8)
    assert tolerance_failures(m, {"flip_margin": 1.0}) == ["flip_margin = 1.8, required <= 1"]
    assert compare_outputs(ref, ref)["flip_margin"] == 0.0
    near_tie_only = compare_outputs(ref[:2], out[:2])
    assert near_tie_only["flip_margin"] == pytest.approx(0.1)
    assert not tolerance_failures(near_tie_only, {"flip_margin": 1})


def test_latency_stats_units():
    s = latency_stats([0.001, 0.002, 0.003, 0.004], batch=8)
    assert s["p50_ms"] == pytest.approx(2.5) and s["mean_ms"] == pytest.approx(2.5)
    assert s["throughput"] == pytest.approx(8 / 0.0025)


def test_plan_says_why_a_node_is_not_cached(built):
    from accelc.build import plan

    tmp, _, cache, _ = built
    steps = ["fuse_modules", "export_onnx", "onnxsim", {"calibrate": {"method": "percentile"}}, "quantize"]
    graph, nodes = plan(write_tiny_recipe(tmp, "p.yaml", passes=steps), cache_dir=cache, out_dir=tmp / "out")
    status = {n.id: (n.status, n.reason) for n in nodes}
    assert status["export_onnx"][0] == "cached"
    assert status["calibrate"] == ("run", "changed in the recipe: passes[3].calibrate.method")
    # quantize without fallback (the default pipeline has fallback: auto), named as the recipe writes it
    assert status["quantize"][0] == "run" and status["quantize"][1].endswith("input changed: table")
    assert "passes[4].quantize.fallback" in status["quantize"][1] and "selection" not in status["quantize"][1]
