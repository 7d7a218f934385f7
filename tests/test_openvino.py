"""The CPU target's OpenVINO runtime: lowering, the ``openvino_ir`` pass, its runner, and trials
scored on OpenVINO. Small models built here; the real model runs in test_e2e.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import write_tiny_recipe
from test_bias_correction import float_model, run, samples, table

from accelc.artifacts import Artifact
from accelc.build import build, prepare
from accelc.errors import PassError
from accelc.graph import unmet
from accelc.host import Host
from accelc.pass_api import PassContext
from accelc.passes.onnxruntime import ort_session
from accelc.passes.openvino import OpenVinoIR, OpenVinoRunner, layer_precisions, openvino_trial_session
from accelc.passes.quantizer import quantize_model
from accelc.passes.sensitivity import Evaluator
from accelc.registry import default_registry
from accelc.runners import RunnerFactory

OV = {"runtime": "openvino"}


def stage(report: dict, node: str) -> dict:
    return next(s for s in report["stages"] if s["node"] == node)


def open_final(out) -> Artifact:
    """The IR a build copied into its out dir, as an artifact for the runner."""
    return Artifact(kind="openvino.ir", path=out, main="model.xml", digest="", meta={"inference_precision": "f32"})


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ov_int8")
    recipe = write_tiny_recipe(tmp, **OV, benchmark={"batch_sizes": [1, 4], "warmup": 1, "iterations": 3})
    out = tmp / "out"
    outcome = build(recipe, out_dir=out, cache_dir=tmp / "cache")
    assert outcome.ok, outcome.result.failure
    return tmp, out, outcome.report


def test_lowering_adds_openvino_ir_after_quantize(tmp_path):
    graph, _ = prepare(write_tiny_recipe(tmp_path, **OV))
    ids = [n.id for n in graph.nodes]
    # the INT8 stage is verified as the IR OpenVINO deploys, not as QDQ on ONNX Runtime
    assert ids[ids.index("quantize") :] == ["quantize", "openvino_ir", "verify[openvino_ir]", "benchmark"]
    assert graph.by_id["openvino_ir"].inputs == {"model": "quantize"}
    assert graph.final == "openvino_ir" and graph.runtime == "openvino"
    assert "openvino" in graph.by_id["verify[openvino_ir]"].requires
    assert "openvino" in graph.by_id["benchmark"].requires


@pytest.mark.parametrize(("runtime", "target", "expected"), [
    ("openvino", "cpu", "openvino"),
    ("onnxruntime", "cpu", "onnxruntime"),
    ("tensorrt", "t4", "onnxruntime"),  # TensorRT scores its QDQ graph on ONNX Runtime
])
def test_trials_run_on_the_recipes_runtime(tmp_path, runtime, target, expected):
    passes = ["fuse_modules", "export_onnx", "onnxsim", {"calibrate": {"method": "auto"}},
              {"quantize": {"fallback": "auto"}}] + (["openvino_ir"] if runtime == "openvino" else [])
    graph, _ = prepare(write_tiny_recipe(tmp_path, runtime=runtime, target=target, passes=passes))
    assert graph.by_id["quantize"].options["runtime"] == expected
    assert graph.by_id["calibrate"].options["selection"]["runtime"] == expected
    assert graph.by_id["quantize"].options["tolerances"] == {"cosine": 0.9}


def test_missing_openvino_blocks_only_what_needs_it(tmp_path):
    graph, _ = prepare(write_tiny_recipe(tmp_path, **OV))
    blocked = unmet(graph, Host(overrides={"openvino": False}))
    assert set(blocked) == {"openvino_ir", "verify[openvino_ir]", "benchmark"}
    assert blocked["openvino_ir"] == [("openvino", "override")]


def test_int8_build_runs_int8_kernels_and_verifies_on_openvino(int8_build):
    _, out, report = int8_build
    assert report["status"] == "ok"
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".xml", ".bin")) == ["model.bin", "model.xml"]
    assert report["final_artifact"] == "model.xml"  # what a runtime loads, not the weights file
    ov = stage(report, "openvino_ir")
    assert ov["artifact"]["kind"] == "openvino.ir"
    layers = ov["metrics"]["layers"]
    # every Conv and the Gemm of the QDQ model became an INT8 kernel: nothing was left in float
    assert layers.get("u8", 0) + layers.get("i8", 0) == 3, layers
    assert layers.get("f32", 0) == 0, layers
    assert stage(report, "verify[openvino_ir]")["metrics"]["cosine"] >= 0.9
    bench = stage(report, "benchmark")["metrics"]
    assert bench["artifact_kind"] == "openvino.ir" and set(bench["batch"]) == {"1", "4"}
    assert all(b["p50_ms"] > 0 for b in bench["batch"].values())


def test_runner_matches_onnxruntime_on_the_float_graph_at_two_batch_sizes(tmp_path):
    recipe = write_tiny_recipe(tmp_path, **OV, precision="fp32", benchmark={"enabled": False})
    out = tmp_path / "out"
    outcome = build(recipe, out_dir=out, cache_dir=tmp_path / "cache")
    assert outcome.ok, outcome.result.failure
    report = outcome.report
    assert stage(report, "openvino_ir")["metrics"]["layers"] == {"f32": 3}
    assert stage(report, "verify[openvino_ir]")["metrics"]["cosine"] > 0.99999
    runner = OpenVinoRunner(open_final(out), threads=1)
    key = stage(report, "onnxsim")["artifact"]["key"]
    sess = ort_session(tmp_path / "cache" / "entries" / key / "model.onnx", threads=1)
    for batch in (1, 5):  # the dynamic batch dimension survives the conversion
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        (got,) = runner.run({"input": x})
        want = sess.run(None, {"input": x})[0]
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_evaluator_scores_on_openvino(int8_build):
    tmp, _, report = int8_build
    qdq = tmp / "cache" / "entries" / stage(report, "quantize")["artifact"]["key"] / "model.onnx"
    x = np.load(tmp / "val.npz")["input"]
    ref = ort_session(qdq, 1).run(None, {"input": x})[0]
    ev_ort = Evaluator({"input": x}, ["input"], ref, batch=8, threads=1)
    ev_ov = Evaluator(
        {"input": x}, ["input"], ref, batch=8, threads=1, runtime="openvino", session=openvino_trial_session
    )
    assert ev_ort.metrics(qdq)["cosine"] > 0.99999  # ORT against itself
    # the same QDQ file on OpenVINO's CPU plugin runs as INT8 kernels, and agrees with ORT
    assert layer_precisions(openvino_trial_session(qdq, 1).compiled) == {"u8": 3}
    assert ev_ov.metrics(qdq)["cosine"] > 0.99
    factory = RunnerFactory(default_registry().runners, default_registry().runtimes)
    with pytest.raises(PassError, match="runtime 'tensorrt' runs no ONNX trial sessions"):
        factory.session(qdq, 1, runtime="tensorrt")


def test_bad_onnx_file_is_a_pass_error_naming_it(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    work = tmp_path / "work"
    work.mkdir()
    ctx = PassContext(workdir=work, signature=None, host=Host(), runners=None, sources=None, node="openvino_ir")
    art = Artifact(kind="onnx", path=tmp_path, main="model.onnx", digest="", meta={})
    with pytest.raises(PassError, match=r"could not convert model\.onnx"):
        OpenVinoIR().run(ctx, {"model": art}, {"inference_precision": "f32"})
    assert not any(work.iterdir())


def test_runner_refuses_the_gpu(int8_build):
    _, out, _ = int8_build
    with pytest.raises(PassError, match="CPU plugin"):
        OpenVinoRunner(open_final(out), device="cuda")


def test_fallback_search_scores_trials_on_openvino(tmp_path):
    passes = ["fuse_modules", "export_onnx", "onnxsim", {"calibrate": {"method": "auto", "candidates": ["minmax"]}},
              {"quantize": {"fallback": "auto", "latency_iterations": 2}}, "openvino_ir"]
    recipe = write_tiny_recipe(tmp_path, **OV, passes=passes, benchmark={"enabled": False})
    outcome = build(recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert outcome.ok, outcome.result.failure
    q = stage(outcome.report, "quantize")["metrics"]
    c = stage(outcome.report, "calibrate")["metrics"]
    assert q["runtime"] == "openvino" and c["runtime"] == "openvino"
    # the kept trial's numbers are OpenVINO's: they equal what verify measures on the IR
    kept = next(t for t in q["trials"] if t["kept"])
    v = stage(outcome.report, "verify[openvino_ir]")["metrics"]
    assert kept["cosine"] == pytest.approx(v["cosine"], abs=1e-6)


def _input_producer(path, node: str) -> str:
    g = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    (n,) = [n for n in g.node if n.name == node]
    return producer.get(n.input[0], "graph input")


def test_float_node_inputs_float_drops_the_qdq_pair_in_front_of_float_nodes(tmp_path):
    fp = float_model(tmp_path / "float.onnx")
    tab = table(fp, samples(0), tmp_path)
    opts = {"bias_correction": False, "nodes_to_exclude": ["conv2"]}
    qdq = quantize_model(fp, tab, tmp_path / "qdq.onnx", opts)
    flt = quantize_model(fp, tab, tmp_path / "flt.onnx", {**opts, "float_node_inputs": "float"})
    assert _input_producer(qdq, "conv2") == "DequantizeLinear"
    assert _input_producer(flt, "conv2") not in ("DequantizeLinear", "QuantizeLinear")
    # the quantized nodes keep their quantized inputs
    assert _input_producer(flt, "conv1") == _input_producer(flt, "fc") == "DequantizeLinear"
    # one quantization error fewer in front of conv2
    x = samples(1)
    ref = run(fp, x)
    assert np.abs(run(flt, x) - ref).mean() < np.abs(run(qdq, x) - ref).mean()
    # the Relu the quantizer folded into conv1's output range runs again in front of conv2
    assert _input_producer(flt, "conv2") == "Relu"
    # OpenVINO: conv1 stays an INT8 kernel (with a float output), conv2 float, fc INT8
    assert layer_precisions(openvino_trial_session(flt, 1).compiled) == {"f32": 1, "u8": 2}


def test_openvino_runtime_defaults_float_node_inputs_unless_the_recipe_sets_it(tmp_path):
    passes = ["fuse_modules", "export_onnx", "onnxsim", {"calibrate": {"method": "auto"}},
              {"quantize": {"fallback": "auto"}}, "openvino_ir"]
    graph, _ = prepare(write_tiny_recipe(tmp_path / "a", **OV, passes=passes))
    assert graph.by_id["quantize"].options["float_node_inputs"] == "float"
    assert graph.by_id["calibrate"].options["selection"]["quantize"]["float_node_inputs"] == "float"
    passes[4] = {"quantize": {"fallback": "auto", "float_node_inputs": "qdq"}}
    graph, _ = prepare(write_tiny_recipe(tmp_path / "b", **OV, passes=passes))
    assert graph.by_id["quantize"].options["float_node_inputs"] == "qdq"
    assert graph.by_id["calibrate"].options["selection"]["quantize"]["float_node_inputs"] == "qdq"
    graph, _ = prepare(write_tiny_recipe(tmp_path / "c"))  # ONNX Runtime: the recipe's QDQ layout
    assert "float_node_inputs" not in graph.by_id["quantize"].options


def test_ctrl_c_still_raises_keyboard_interrupt_after_openvino_ran(tmp_path):
    """OpenVINO 2026.4's CPU plugin leaves the thread's alternate signal stack pointing at memory
    it frees when plugin instances go away out of order; accelc keeps one Core alive, so SIGINT
    after scoring sessions still unwinds (a subprocess, since the failure is a segfault)."""
    fp = float_model(tmp_path / "float.onnx")
    script = f"""
import gc, signal
import numpy as np
from accelc.passes.openvino import openvino_trial_session
# two sessions alive at once, released first-in first-out (as side-by-side latency does)
a = openvino_trial_session({str(fp)!r}, 1)
b = openvino_trial_session({str(fp)!r}, 1)
for s in (a, b):
    s.run({{"x": np.zeros((1, 3, 8, 8), np.float32)}})
del s, a
gc.collect()
del b
gc.collect()
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    signal.raise_signal(signal.SIGINT)
except KeyboardInterrupt:
    print("unwound")
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "unwound", (p.returncode, p.stderr[-500:])


def test_openvino_errors_are_named_by_their_message_not_the_source_location(tmp_path):
    from accelc.passes.openvino import openvino_convert

    bad = tmp_path / "dangling.onnx"
    from onnx import TensorProto, helper

    graph = helper.make_graph(  # Clip reads a bound nothing produces
        [helper.make_node("Clip", ["x", "nowhere"], ["y"])], "dangling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(bad))
    with pytest.raises(PassError) as err:
        openvino_convert(bad)
    msg = str(err.value)
    assert msg.startswith("OpenVINO could not convert dangling.onnx: ")
    assert "Exception from" not in msg and not msg.rstrip().endswith(".cpp:")
    assert "nowhere" in msg  # the tensor that is missing
