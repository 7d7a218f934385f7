"""Accuracy-aware INT8: calibration choice, bias correction, sensitivity ranking, fallback, and the
failures that name why.

The model is built in the test: a small CNN in which one convolution (``loud``) writes a
large-range activation (one channel 1000x the others, divided back by a per-channel Div that
ONNX Runtime does not quantize). Quantizing that tensor per-tensor wipes out the other
channels, so that convolution is the one node whose INT8 output ruins the model.

Bias correction restores the wiped channels' means, which rescues most of that damage (its
own test shows how much), so the fallback tests turn it off: they exercise the search on a
layer that only float can save.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from accelc.build import build, plan, prepare
from accelc.errors import GraphError
from accelc.passes.qdq import pin_float_nodes
from accelc.passes.sensitivity import quality_key, search_fallback

MODULE = "accelc_test_sensitive_net"
MODEL_SOURCE = '''
"""(N, 3, 16, 16) float32 -> (N, 10): conv-relu, a large-range conv, conv, pool, linear."""
import torch
from torch import nn


class SensitiveNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.loud = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10, bias=False)
        gain = torch.ones(1, 8, 1, 1)
        gain[0, 0] = 1000.0
        with torch.no_grad():  # channel 0 of loud's output is 1000x larger than the others
            self.loud.weight[0] *= 1000.0
            self.loud.bias[0] *= 1000.0
        self.register_buffer("gain", gain)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.loud(x) / self.gain)
        return self.fc(self.conv3(x).mean((2, 3)))
'''

STEPS_PREFIX = ["fuse_modules", "export_onnx", "onnxsim"]


def write_project(
    tmp: Path,
    name: str = "recipe.yaml",
    calibrate: dict | None = None,
    quantize: dict | None = None,
    tolerances: dict | None = None,
    verify: bool = True,
    runtime: str | None = None,
) -> Path:
    """Model module, calibration (24) and validation (32) samples, and a CPU INT8 recipe
    (``bias_correction`` off unless ``quantize`` turns it on; ``runtime: openvino`` adds the
    ``openvino_ir`` pass)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f"{MODULE}.py").write_text(MODEL_SOURCE)
    rng = np.random.default_rng(0)
    if not (tmp / "cal.npz").exists():
        np.savez(tmp / "cal.npz", input=rng.standard_normal((24, 3, 16, 16)).astype(np.float32))
        np.savez(tmp / "val.npz", input=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    quantize = {"bias_correction": False, **(quantize or {})}
    recipe = {
        "name": "sensitive",
        "model": {"source": "python", "callable": f"{MODULE}:SensitiveNet", "path": str(tmp)},
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 16, 16],
                "dynamic": [{"axis": 0, "name": "batch", "min": 1, "opt": 1, "max": 16}],
            }
        ],
        "target": "cpu",
        "precision": "int8",
        "data": {"calibration": {"tensors": "cal.npz"}, "validation": {"tensors": "val.npz"}},
        "passes": [*STEPS_PREFIX, {"calibrate": calibrate or {}}, {"quantize": quantize}],
        "verify": {"enabled": verify, "tolerances": tolerances or {"cosine": 0.99}},
        "benchmark": {"enabled": False},
    }
    if runtime:
        recipe["runtime"] = runtime
        if runtime == "openvino":
            recipe["passes"].append("openvino_ir")
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def stage(report: dict, node: str) -> dict:
    return next(s for s in report["stages"] if s["node"] == node)


def loud_node(report: dict, cache: Path) -> str:
    """Name of the float graph's Conv whose output feeds the Div (the large-range convolution)."""
    key = stage(report, "onnxsim")["artifact"]["key"]
    g = onnx.load(str(cache / "entries" / key / "model.onnx")).graph
    div_inputs = {i for n in g.node if n.op_type == "Div" for i in n.input}
    (name,) = [n.name for n in g.node if n.op_type == "Conv" and n.output[0] in div_inputs]
    return name


QUICK = {"latency_iterations": 4}


@pytest.fixture(scope="module")
def fallback_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fallback")
    recipe = write_project(
        tmp,
        calibrate={"method": "auto", "selection": {"latency_iterations": 4}},
        quantize={"fallback": "auto", "max_fp32_nodes": 3, **QUICK},
    )
    cache = tmp / "cache"
    return tmp, recipe, cache, build(recipe, out_dir=tmp / "out", cache_dir=cache)


def test_sensitivity_ranks_the_large_range_conv_first_and_fallback_keeps_only_it_in_float(fallback_build):
    tmp, _, cache, outcome = fallback_build
    assert outcome.ok, outcome.result.failure
    m = stage(outcome.report, "quantize")["metrics"]
    loud = loud_node(outcome.report, cache)
    ranking = m["sensitivity"]
    assert ranking[0]["node"] == loud
    assert ranking[0]["cosine_loss"] > 10 * ranking[1]["cosine_loss"]  # it stands out, it does not just lead
    assert [r["rank"] for r in ranking] == list(range(1, len(ranking) + 1))
    full, kept = m["trials"][0], next(t for t in m["trials"] if t["kept"])
    assert not full["passed"] and full["cosine"] < 0.99 and full["fp32_nodes"] == []
    assert kept["passed"] and kept["fp32_nodes"] == [loud] and m["fp32_nodes"] == [loud]
    assert set(m["latency"]) >= {"fp32_ms", "int8_ms", "kept_ms", "threads", "batch"}
    # the deployed model is the kept trial: loud's weights stay float, everything else is INT8
    q = onnx.load(str(outcome.out_dir / "model.onnx")).graph
    node = next(n for n in q.node if n.name == loud)
    assert node.input[1] in {i.name for i in q.initializer}  # a float initializer, no DequantizeLinear
    assert sum(n.op_type == "QuantizeLinear" for n in q.node) > 0
    ver = stage(outcome.report, "verify[quantize]")["metrics"]
    assert ver["cosine"] == pytest.approx(kept["cosine"], abs=1e-6)  # the pass's own check is verify's number


def test_calibration_auto_keeps_the_best_trial_and_keeps_every_table(fallback_build):
    _, _, cache, outcome = fallback_build
    st = stage(outcome.report, "calibrate")
    m = st["metrics"]
    assert [t["method"] for t in m["trials"]] == ["minmax", "entropy", "percentile"]
    kept = [t for t in m["trials"] if t["kept"]]
    assert len(kept) == 1 and kept[0]["method"] == m["method"]
    tol = {"cosine": 0.99}
    assert quality_key(kept[0], tol) == max(quality_key(t, tol) for t in m["trials"])
    entry = cache / "entries" / st["artifact"]["key"]
    assert sorted(p.name for p in (entry / "tables").iterdir()) == ["entropy.json", "minmax.json", "percentile.json"]
    assert (entry / "calibration.json").read_bytes() == (entry / "tables" / f"{m['method']}.json").read_bytes()


def test_quantize_starts_from_the_full_int8_model_calibrate_kept(fallback_build, tmp_path):
    _, _, cache, outcome = fallback_build
    cal, q = stage(outcome.report, "calibrate"), stage(outcome.report, "quantize")
    assert "calibrate" in q["metrics"]["full_int8"]
    kept = next(t for t in cal["metrics"]["trials"] if t["kept"])
    full = q["metrics"]["trials"][0]
    for k in ("top1_agreement", "cosine", "cosine_min", "mean_abs_error"):
        assert full[k] == pytest.approx(kept[k], abs=1e-9)
    # a calibrate step scoring another format hands nothing over: quantize builds its own
    recipe = write_project(
        tmp_path / "other",
        calibrate={"method": "auto", "selection": {"latency_iterations": 4, "quantize": {"per_channel": False}}},
        quantize={"fallback": "auto", "max_fp32_nodes": 3, **QUICK},
    )
    other = build(recipe, out_dir=tmp_path / "other" / "out", cache_dir=tmp_path / "other" / "cache")
    assert "full_int8" not in stage(other.report, "quantize")["metrics"]


def test_report_shows_trials_and_sensitivity(fallback_build):
    _, _, cache, outcome = fallback_build
    md = (outcome.out_dir / "report.md").read_text()
    assert "## Trials of `calibrate`" in md and "## Trials of `quantize`" in md
    assert "### Sensitivity" in md and f"| 1 | `{loud_node(outcome.report, cache)}` |" in md
    assert "0 (full INT8)" in md and "**yes**" in md and "Kept: 1 node(s) in float" in md


def test_rebuild_repeats_no_trial(fallback_build):
    tmp, recipe, cache, first = fallback_build
    again = build(recipe, out_dir=tmp / "out2", cache_dir=cache)
    assert again.ok
    assert all(s["cached"] for s in again.report["stages"])
    assert stage(again.report, "quantize")["metrics"] == stage(first.report, "quantize")["metrics"]


def run_cli(recipe: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    args = ["build", str(recipe), "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "out")]
    return subprocess.run([sys.executable, "-m", "accelc.cli", *args], cwd=tmp, env=env, capture_output=True, text=True)


def test_unreachable_tolerance_fails_with_the_ranked_list_and_nonzero_exit(tmp_path):
    recipe = write_project(
        tmp_path, quantize={"fallback": "auto", "max_fp32_nodes": 1, **QUICK}, tolerances={"cosine": 0.99999999}
    )
    r = run_cli(recipe, tmp_path)
    assert r.returncode == 5, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert "verification failed at quantize" in err and "cosine" in err and "max_fp32_nodes" in err
    rep = yaml.safe_load((tmp_path / "out" / "report.json").read_text())
    loud = loud_node(rep, tmp_path / "cache")
    assert f"Most sensitive nodes: {loud} (Conv" in err  # ranked first in the message
    m = stage(rep, "quantize")["metrics"]
    assert m["sensitivity"][0]["node"] == loud and m["kept"].startswith("none")
    assert [t["fp32_nodes"] for t in m["trials"]] == [[], [loud]]  # full INT8, then the one allowed fallback
    assert not any(t["passed"] for t in m["trials"]) and not (tmp_path / "out" / "model.onnx").exists()


def test_without_fallback_permission_the_failure_names_nodes_and_the_option(tmp_path):
    recipe = write_project(tmp_path, quantize={"fallback": "off", **QUICK})
    outcome = build(recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert not outcome.ok
    msg = str(outcome.result.failure)
    loud = loud_node(outcome.report, tmp_path / "cache")
    assert f"Most sensitive nodes: {loud}" in msg and "fallback: auto, max_fp32_nodes: N" in msg
    m = stage(outcome.report, "quantize")["metrics"]
    assert len(m["trials"]) == 1 and m["sensitivity"][0]["node"] == loud


def test_fallback_needs_a_verified_quantize_stage(tmp_path):
    recipe = write_project(tmp_path, quantize={"fallback": "auto"}, verify=False)
    with pytest.raises(GraphError, match="fallback 'auto' needs the quantize stage's tolerances"):
        prepare(recipe)


def test_lowering_passes_stage_tolerances_and_quantize_format_into_the_trials(tmp_path):
    p = write_project(
        tmp_path,
        calibrate={"method": "auto"},
        quantize={"fallback": "auto", "per_channel": False},
        tolerances={"cosine": 0.9},
    )
    raw = yaml.safe_load(p.read_text())
    raw["verify"]["stages"] = {"quantize": {"cosine": 0.95, "top1_agreement": 0.5}}
    p.write_text(yaml.safe_dump(raw))
    graph, _ = prepare(p)
    q, c = graph.by_id["quantize"], graph.by_id["calibrate"]
    assert q.options["tolerances"] == {"cosine": 0.95, "top1_agreement": 0.5}
    assert set(q.inputs) == {"model", "table", "calibration", "reference", "validation"}
    assert c.options["selection"]["quantize"]["per_channel"] is False
    assert "fallback" not in c.options["selection"]["quantize"]
    assert c.options["selection"]["tolerances"] == q.options["tolerances"]
    assert set(c.inputs) == {"model", "data", "reference", "validation"}


def test_plain_quantize_stays_plain(tmp_path):
    graph, _ = prepare(write_project(tmp_path))
    q, c = graph.by_id["quantize"], graph.by_id["calibrate"]
    assert "tolerances" not in q.options and set(q.inputs) == {"model", "table"}
    assert "selection" not in c.options and set(c.inputs) == {"model", "data"}


def node_keys(recipe: Path, tmp: Path) -> dict[str, str]:
    _, planned = plan(recipe, cache_dir=tmp / "cache", out_dir=tmp / "out")
    return {p.id: p.key for p in planned}


def test_tolerances_are_in_the_key_only_when_they_choose_the_fallback(tmp_path):
    plain = node_keys(write_project(tmp_path, "a.yaml"), tmp_path)
    plain_opts = node_keys(write_project(tmp_path, "b.yaml", quantize={"max_fp32_nodes": 3}), tmp_path)
    plain_tol = node_keys(write_project(tmp_path, "c.yaml", tolerances={"cosine": 0.5}), tmp_path)
    assert plain_opts == plain and plain_tol == plain  # options only the fallback reads change nothing
    auto = node_keys(write_project(tmp_path, "d.yaml", quantize={"fallback": "auto"}), tmp_path)
    auto_tol = node_keys(
        write_project(tmp_path, "e.yaml", quantize={"fallback": "auto"}, tolerances={"cosine": 0.995}), tmp_path
    )
    assert auto["quantize"] != plain["quantize"] and auto_tol["quantize"] != auto["quantize"]
    assert auto_tol["calibrate"] == auto["calibrate"] == plain["calibrate"]


def test_bisection_finds_the_smallest_passing_count_when_monotone():
    tried: list[int] = []

    def trial(k: int) -> dict:
        tried.append(k)
        return {"k": k, "passed": k >= 3}

    best = search_fallback([{}] * 10, 8, trial, "bisect")
    assert best == {"k": 3, "passed": True} and tried[0] == 8 and len(tried) <= 4
    tried.clear()
    assert search_fallback([{}] * 10, 8, trial, "greedy") == {"k": 3, "passed": True} and tried == [1, 2, 3]
    tried.clear()
    assert search_fallback([{}] * 10, 2, trial, "bisect") is None and tried == [2]  # the cap fails: stop


def test_openvino_sensitivity_counts_the_rounding_of_a_nodes_output(tmp_path):
    """On OpenVINO (``float_node_inputs: float``) each probe quantizes one node with the Q/DQ pair on
    its output, as the built model has it: the loud convolution, whose INT8 output ruins the
    model, ranks first and is the one node kept in float. (A probe that dropped that pair, its
    consumers being float in the probe, ranked it last and kept three nodes.)"""
    recipe = write_project(tmp_path, quantize={"fallback": "auto", "max_fp32_nodes": 3, **QUICK}, runtime="openvino")
    outcome = build(recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert outcome.ok, outcome.result.failure
    q = stage(outcome.report, "quantize")["metrics"]
    loud = loud_node(outcome.report, tmp_path / "cache")
    assert q["runtime"] == "openvino"
    assert q["sensitivity"][0]["node"] == loud and q["fp32_nodes"] == [loud]


def _float_node_between_qdq(op: str) -> tuple[onnx.ModelProto, list[int]]:
    """x -> Q/DQ -> one Conv/Gemm left in float (its output channels' weights differ 1000x in range) -> Q/DQ,
    the pattern ``quantize_static(nodes_to_exclude=[that node])`` writes between quantized neighbours.
    Returns the model and the input shape."""
    rng = np.random.default_rng(0)
    if op == "Conv":  # depthwise, 4 channels
        shape, out_shape = [1, 4, 8, 8], [1, 4, 8, 8]
        w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
        w[0] *= 1000.0
        node = helper.make_node("Conv", ["xd", "w", "b"], ["c"], name="float_op", group=4, pads=[1, 1, 1, 1])
    else:  # Gemm, transB=1 (weight (N, K)) as torch's Linear exports it, and transB=0
        trans_b = int(op == "Gemm_transB")
        shape, out_shape = [2, 6], [2, 4]
        w = rng.standard_normal((4, 6)).astype(np.float32)
        w[0] *= 1000.0
        w = w if trans_b else np.ascontiguousarray(w.T)
        node = helper.make_node("Gemm", ["xd", "w", "b"], ["c"], name="float_op", transB=trans_b)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        node,
        helper.make_node("QuantizeLinear", ["c", "s_out", "z"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "s_out", "z"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "s"),
        numpy_helper.from_array(np.array(6 / 255, np.float32), "s_out"),
        numpy_helper.from_array(np.array(0, np.uint8), "z"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(4, 0.1, np.float32), "b"),
    ]
    g = helper.make_graph(
        nodes,
        "float_op_between_qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), shape


@pytest.mark.parametrize("op", ["Conv", "Gemm_transB", "Gemm"])
def test_excluded_node_stays_float_under_onnxruntime_optimizations(op):
    import onnxruntime as ort

    model, shape = _float_node_between_qdq(op)
    x = np.random.default_rng(1).uniform(0, 4, shape).astype(np.float32)

    def run(level: ort.GraphOptimizationLevel) -> np.ndarray:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    exact = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # DQ, then the float node, then Q/DQ
    plain = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    # ORT's WeightBiasQuantization re-quantizes the float weights per tensor: the small channels are lost
    assert np.abs(plain[:, 1:] - exact[:, 1:]).max() > 1.0
    assert pin_float_nodes(model) == ["float_op"]
    onnx.checker.check_model(model)
    pinned = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    np.testing.assert_allclose(pinned, exact, atol=0.03)  # at most one output step apart


def test_report_opens_with_a_summary_and_embeds_non_empty_plots(fallback_build):
    """The three plots are drawn from this build's trials, sensitivity ranking and batch-1 timings,
    are real PNGs with content, and report.md shows them after a summary that comes first."""
    from PIL import Image

    tmp, recipe, cache, _ = fallback_build
    # the same build with its benchmark on: every other stage comes from the cache
    doc = yaml.safe_load(recipe.read_text())
    doc["benchmark"] = {"batch_sizes": [1], "warmup": 2, "iterations": 30}
    (tmp / "bench.yaml").write_text(yaml.safe_dump(doc))
    outcome = build(tmp / "bench.yaml", out_dir=tmp / "bench", cache_dir=cache)
    assert outcome.ok, outcome.result.failure
    out = outcome.out_dir
    md = (out / "report.md").read_text()
    for name in ("accuracy_latency.png", "sensitivity.png", "latency_batch1.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        with Image.open(png) as im:
            pixels = np.asarray(im.convert("L"))
        assert pixels.shape[0] > 200 and pixels.std() > 5, name  # not a blank canvas
        assert f"]({name})" in md
    b1 = stage(outcome.report, "benchmark")["metrics"]["batch"]["1"]
    assert len(b1["latencies_ms"]) == stage(outcome.report, "benchmark")["metrics"]["iterations"]
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert md.index("## Summary") < md.index("## Accuracy") < md.index("## Speed") < md.index("## Stages")
    assert "**Built**: INT8 `model.onnx`" in summary and "**Accuracy held**" in summary
    # measured against both baselines, timed in the benchmark pass
    assert re.search(r"x (faster|slower)\*\* than the source model in eager PyTorch", summary)
    assert re.search(r"x (faster|slower)\*\* than FP32 ONNX", summary)
    assert "node(s) kept in float" in summary  # the warning that the search kept a node in float


def test_sensitivity_probes_run_at_batch_2(tmp_path, monkeypatch):
    import accelc.passes.quantization as quantization

    batches = []

    class Recording(quantization.Evaluator):
        def __init__(self, arrays, names, reference, batch, *a, **k):
            batches.append(batch)
            super().__init__(arrays, names, reference, batch, *a, **k)

    monkeypatch.setattr(quantization, "Evaluator", Recording)  # only the sensitivity probes use it there
    recipe = write_project(tmp_path, quantize={"fallback": "auto", "max_fp32_nodes": 1, **QUICK})
    outcome = build(recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert outcome.ok, outcome.result.failure
    assert stage(outcome.report, "quantize")["metrics"]["sensitivity"]  # the ranking ran
    assert batches and set(batches) == {quantization.SENSITIVITY_BATCH}  # the verify batch is 16
