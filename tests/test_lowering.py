"""Lowering a recipe into a pass graph, and checking it against a host before anything runs."""

from __future__ import annotations

import pytest
from builders import REPO, write_tiny_recipe

from accelc.build import prepare
from accelc.cache import Store
from accelc.errors import GraphError
from accelc.executor import Executor
from accelc.graph import unmet
from accelc.host import Host, parse_capability


def test_cpu_int8_graph_order_and_wiring(tmp_path):
    graph, _ = prepare(write_tiny_recipe(tmp_path))
    ids = [n.id for n in graph.nodes]
    assert ids == [
        "load_model",
        "load_data[calibration]",
        "load_data[validation]",
        "reference",
        "fuse_modules",
        "export_onnx",
        "onnxsim",
        "verify[onnxsim]",
        "calibrate",
        "quantize",
        "verify[quantize]",
        "benchmark",
    ]
    by = graph.by_id
    assert by["reference"].inputs == {
        "model": "load_model",
        "data": "load_data[validation]",
    }  # the *source* model
    assert by["export_onnx"].inputs == {"model": "fuse_modules"}
    # the accuracy-aware default: calibrate method auto scores its trials on the validation set
    assert by["calibrate"].options["method"] == "auto" and by["quantize"].options["fallback"] == "auto"
    assert by["calibrate"].inputs == {
        "model": "onnxsim",
        "data": "load_data[calibration]",
        "reference": "reference",
        "validation": "load_data[validation]",
    }
    # bias correction (on by default) reads the calibration samples
    # and fallback auto verifies its trials against the source model's outputs
    assert by["quantize"].inputs == {
        "model": "onnxsim",
        "table": "calibrate",
        "calibration": "load_data[calibration]",
        "reference": "reference",
        "validation": "load_data[validation]",
    }
    assert by["verify[quantize]"].inputs["artifact"] == "quantize"
    # baselines for the report's speed-ups: the source model and the float ONNX graph
    assert by["benchmark"].inputs == {"artifact": "quantize", "source": "load_model", "float": "onnxsim"}
    assert graph.final == "quantize"


def test_stage_tolerances_override_global(tmp_path):
    p = write_tiny_recipe(
        tmp_path, verify={"tolerances": {"cosine": 0.9}, "stages": {"onnxsim": {"cosine": 0.9999}}}
    )
    graph, _ = prepare(p)
    assert graph.by_id["verify[onnxsim]"].options["tolerances"] == {"cosine": 0.9999}
    assert graph.by_id["verify[quantize]"].options["tolerances"] == {"cosine": 0.9}


def test_explicit_pass_list_and_verify_after(tmp_path):
    p = write_tiny_recipe(
        tmp_path,
        passes=["export_onnx", "calibrate", "quantize"],
        verify={"after": ["quantize"]},
        benchmark={"enabled": False},
    )
    graph, _ = prepare(p)
    assert [n.id for n in graph.nodes][-4:] == ["export_onnx", "calibrate", "quantize", "verify[quantize]"]


def test_verify_after_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(GraphError, match="verify.after names onnxsim"):
        prepare(write_tiny_recipe(tmp_path, passes=["export_onnx"], verify={"after": ["onnxsim"]}))


def test_missing_calibration_data_is_caught_before_running(tmp_path):
    p = write_tiny_recipe(tmp_path, data={"calibration": None})
    with pytest.raises(GraphError, match=r"calibrate.*calibration.data.*data.calibration"):
        prepare(p)


def test_precision_the_target_cannot_build(tmp_path):
    with pytest.raises(GraphError, match="does not build fp16"):
        prepare(write_tiny_recipe(tmp_path, precision="fp16"))


def test_t4_plan_on_cpu_host_blocks_trt_engine(tmp_path):
    graph, reg = prepare(REPO / "recipes" / "resnet18_t4_int8.yaml")
    no_gpu = Host(overrides={"cuda": None, "tensorrt": None})
    blocked = unmet(graph, no_gpu)
    first = next(n.id for n in graph.nodes if n.id in blocked)
    assert first == "trt_engine"
    assert {c for c, _ in blocked["trt_engine"]} == {"cuda", "tensorrt"}
    # everything up to the QDQ model can run here
    runnable = [n.id for n in graph.nodes[: [n.id for n in graph.nodes].index("trt_engine")]]
    assert {"quantize", "verify[quantize]", "calibrate"} <= set(runnable)
    assert not any(r in blocked for r in runnable)
    plan = Executor(graph, reg, Store(tmp_path / "c"), no_gpu).plan()
    assert [p.status for p in plan if p.id == "trt_engine"] == ["blocked"]


def test_t4_plan_on_a_t4_host_blocks_nothing():
    graph, _ = prepare(REPO / "recipes" / "resnet18_t4_int8.yaml")
    t4 = Host(overrides={"cuda": {"name": "Tesla T4", "sm": 75, "count": 1}, "tensorrt": "10.13.0"})
    assert unmet(graph, t4) == {}
    older = Host(overrides={"cuda": {"name": "Tesla P4", "sm": 61, "count": 1}, "tensorrt": "10.13.0"})
    assert parse_capability("sm>=75") == ("sm", ">=", 75)
    assert not older.check("sm>=75")[0]
