"""Fallback trials by graph surgery: a node made float again in the full INT8 model is the model
``quantize_static`` writes with that node in ``nodes_to_exclude``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_bias_correction import float_model, run, samples, table

from accelc.errors import PassError
from accelc.passes.quantizer import exclude_nodes, quantize_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("surgery")
    fp = float_model(tmp / "float.onnx")
    cal = samples(0)
    return fp, cal, table(fp, cal, tmp), tmp


def _float_weighted(path) -> set[str]:
    """Names of the Conv/Gemm nodes of a QDQ model whose weight is a float initializer."""
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    return {n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits}


@pytest.mark.parametrize("nodes", [["conv1", "relu1"], ["conv2"], ["conv1", "relu1", "conv2"], ["fc"]])
@pytest.mark.parametrize("layout", ["qdq", "float"])
@pytest.mark.parametrize("correct", [False, True])
def test_surgery_writes_the_model_quantize_static_writes_with_the_nodes_excluded(setup, nodes, layout, correct):
    fp, cal, tab, tmp = setup
    tag = f"{'_'.join(nodes)}_{layout}_{correct}"
    opts = {"float_node_inputs": layout, "bias_correction": correct}
    raw = quantize_model(fp, tab, tmp / f"raw_{tag}.onnx", {**opts, "bias_correction": False})
    ref = quantize_model(fp, tab, tmp / f"ref_{tag}.onnx", opts, nodes, calibration=cal)
    cut = exclude_nodes(fp, raw, tmp / f"cut_{tag}.onnx", opts, nodes, calibration=cal)
    weighted = {n for n in nodes if n != "relu1"}
    assert _float_weighted(cut) == _float_weighted(ref) == weighted
    x = samples(1, 16)
    np.testing.assert_allclose(run(cut, x), run(ref, x), rtol=0, atol=1e-5)
    # and it is not the full INT8 model
    assert np.abs(run(cut, x) - run(raw, x)).max() > 1e-3


def test_surgery_leaves_no_qdq_pair_between_float_nodes(setup):
    fp, cal, tab, tmp = setup
    raw = quantize_model(fp, tab, tmp / "raw_pairs.onnx", {"bias_correction": False})
    cut = onnx.load(str(exclude_nodes(fp, raw, tmp / "cut_pairs.onnx", {"bias_correction": False},
                                      ["conv1", "relu1", "conv2"])))
    producer = {o: n for n in cut.graph.node for o in n.output}
    by_name = {n.name: n for n in cut.graph.node}
    # conv1 reads the graph input as it is; conv2 reads conv1's float output (through its Relu)
    assert by_name["conv1"].input[0] == "x"
    assert producer[by_name["conv2"].input[0]].op_type == "Relu"
    assert "relu1" not in {n.name for n in onnx.load(str(raw)).graph.node}  # folded there, restored here


def test_surgery_names_a_node_the_float_model_lacks(setup):
    fp, _, tab, tmp = setup
    raw = quantize_model(fp, tab, tmp / "raw_bad.onnx", {"bias_correction": False})
    with pytest.raises(PassError, match="no node named nope"):
        exclude_nodes(fp, raw, tmp / "bad.onnx", {"bias_correction": False}, ["nope"])


def _save(path, name, nodes, inits):
    """A graph ``x (N, 3, 8, 8) -> y (N, 4, 8, 8)`` of ``nodes`` saved at ``path`` (opset 18)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def _conv_div_model(path):
    """(N, 3, 8, 8) -> (N, 4, 8, 8): Conv, Div by a constant (an op the quantizer leaves float), Relu, Conv."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1"),
        numpy_helper.from_array(np.full((1, 4, 1, 1), 2.0, np.float32), "d"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Div", ["c1", "d"], ["q"], name="div"),
        helper.make_node("Relu", ["q"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
    ]
    return _save(path, "conv_div", nodes, inits)


def test_a_float_node_before_an_op_the_quantizer_leaves_float_writes_float(tmp_path):
    fp = _conv_div_model(tmp_path / "float.onnx")
    tab = table(fp, samples(0), tmp_path)
    opts = {"bias_correction": False}
    raw = quantize_model(fp, tab, tmp_path / "raw.onnx", opts)
    ref = quantize_model(fp, tab, tmp_path / "ref.onnx", opts, ["conv1"])
    cut = exclude_nodes(fp, raw, tmp_path / "cut.onnx", opts, ["conv1"])
    raw_consumers = {i: n for n in onnx.load(str(raw)).graph.node for i in n.input}
    assert raw_consumers["c1"].op_type == "QuantizeLinear"  # the INT8 conv1's output is quantized
    by_name = {n.name: n for n in onnx.load(str(cut)).graph.node}
    assert by_name["div"].input[0] == by_name["conv1"].output[0]  # no Q/DQ pair the Div would read
    x = samples(1, 8)
    np.testing.assert_allclose(run(cut, x), run(ref, x), rtol=0, atol=1e-5)


def _conv_clip_model(path):
    """(N, 3, 8, 8) -> (N, 4, 8, 8): Conv, Clip(0, 6) whose bounds are Constant nodes (as the
    TorchScript exporter writes them), Conv."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Constant", [], ["lo"], name="lo", value=numpy_helper.from_array(np.array(0, np.float32))),
        helper.make_node("Constant", [], ["hi"], name="hi", value=numpy_helper.from_array(np.array(6, np.float32))),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r"], name="clip"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
    ]
    return _save(path, "conv_clip", nodes, inits)


@pytest.mark.parametrize("nodes", [["conv2"], ["conv1", "clip"]])
def test_a_restored_clip_brings_its_constant_bounds_along(tmp_path, nodes):
    fp = _conv_clip_model(tmp_path / "float.onnx")
    tab = table(fp, samples(0), tmp_path)
    opts = {"bias_correction": False, "float_node_inputs": "float"}
    raw = quantize_model(fp, tab, tmp_path / "raw.onnx", opts)
    assert "clip" not in {n.name for n in onnx.load(str(raw)).graph.node}  # folded into conv1's output range
    ref = quantize_model(fp, tab, tmp_path / "ref.onnx", opts, nodes)
    cut = exclude_nodes(fp, raw, tmp_path / "cut.onnx", opts, nodes)
    for path in (ref, cut):
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)  # no input without a producer
    x = samples(1, 8)
    np.testing.assert_allclose(run(cut, x), run(ref, x), rtol=0, atol=1e-5)
