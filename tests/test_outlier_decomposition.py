"""Outlier-channel decomposition before dynamic INT8 (passes/outlier_decomposition.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from accelc.passes.dynamic_quantization import quantization_facts, quantize_dynamic_model
from accelc.passes.outlier_decomposition import (
    OUTLIER_MATMUL_SUFFIX,
    channel_absmax,
    decompose_outliers,
    outlier_channels,
)

K, N = 64, 48


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    """y = GELU-like(x) W + b: x (B, S, K) float32 -> y (B, S, N)."""
    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["h"], name="act"),
            helper.make_node("MatMul", ["h", "w"], ["mm"], name="dense/MatMul"),
            helper.make_node("Add", ["mm", "b"], ["y"], name="dense/Add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.linspace(-1, 1, N, dtype=np.float32), "b")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _activations(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(0, 1, (n, 8, K)).astype(np.float32)
    x[..., 5] *= 30  # one outlier channel in every token, as in BERT's feed-forward inputs
    return x


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


class _Session:
    """A session factory as accelc's runners give one: a path or serialized model bytes."""

    def __init__(self, model):
        model = model if isinstance(model, bytes) else str(model)
        self.s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def run(self, feeds):
        return self.s.run(None, feeds)


def test_outlier_channels_are_those_far_above_the_median_channel():
    a = np.ones(100, np.float32)
    a[[3, 70]] = [10.0, 50.0]
    a[40] = 5.0
    assert outlier_channels(a, 6, 32).tolist() == [3, 70]
    assert outlier_channels(a, 6, 1).tolist() == [70]  # the largest first when capped
    assert outlier_channels(a, 4, 32).tolist() == [3, 40, 70]
    assert outlier_channels(np.zeros(8, np.float32), 6, 32).tolist() == []


def test_decomposition_computes_the_same_function_and_dynamic_int8_error_drops(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (K, N)).astype(np.float32)
    model = _matmul_model(w)
    src = tmp_path / "float.onnx"
    onnx.save(model, str(src))
    calib, x = _activations(rng, 16), _activations(rng, 8)
    absmax = channel_absmax(src, [{"x": calib[i : i + 4]} for i in range(0, 16, 4)], ["h"], _Session)
    np.testing.assert_allclose(absmax["h"], np.maximum(calib, 0).reshape(-1, K).max(0), rtol=1e-6)

    dec, records = decompose_outliers(model, absmax, threshold=6, max_channels=32)
    assert records == [{"node": "dense/MatMul", "channels": 1, "of": K, "absmax_ratio": records[0]["absmax_ratio"]}]
    assert records[0]["absmax_ratio"] > 5
    dec_path = tmp_path / "decomposed.onnx"
    onnx.save(dec, str(dec_path))
    onnx.checker.check_model(dec)
    ref = _run(src, x)
    np.testing.assert_allclose(_run(dec_path, x), ref, rtol=1e-5, atol=1e-5)  # the same function in float

    opts = {"op_types": ["MatMul"]}
    plain = quantize_dynamic_model(src, tmp_path / "plain.onnx", opts, [])
    split = quantize_dynamic_model(dec_path, tmp_path / "split.onnx", opts, [f"dense/MatMul{OUTLIER_MATMUL_SUFFIX}"])

    def err(path):
        return float(np.linalg.norm(_run(path, x) - ref) / np.linalg.norm(ref))

    # one channel 30x the rest makes the per-tensor u8 step ~30x coarser for all the others
    assert err(split) < err(plain) / 4, (err(split), err(plain))
    q = onnx.load(str(split))
    facts = quantization_facts(dec, q, ["MatMul"])
    # the split-off float MatMul is not counted as a MatMul left float
    assert facts["quantized"] == {"MatMulInteger": 1} and facts["float_remaining"] == {}
    assert any(n.name.endswith(OUTLIER_MATMUL_SUFFIX) and n.op_type == "MatMul" for n in q.graph.node)


def test_no_outliers_means_no_change(tmp_path):
    rng = np.random.default_rng(1)
    model = _matmul_model(rng.normal(0, 0.1, (K, N)).astype(np.float32))
    absmax = {"h": np.abs(rng.normal(0, 1, K)).astype(np.float32) + 1}
    dec, records = decompose_outliers(model, absmax, threshold=6, max_channels=32)
    assert records == [] and [n.name for n in dec.graph.node] == [n.name for n in model.graph.node]


def test_projections_of_one_activation_share_the_split_and_keep_their_bias_add(tmp_path):
    """Q and K read the same x: one Mul and one Gather serve both, and each INT8 MatMul still feeds
    its own bias Add directly (so ONNX Runtime fuses MatMulIntegerToFloat with the bias)."""
    rng = np.random.default_rng(2)
    wq, wk = (rng.normal(0, 0.1, (K, N)).astype(np.float32) for _ in range(2))
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q/MatMul"),
            helper.make_node("Add", ["q0", "bq"], ["q"], name="q/Add"),
            helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k/MatMul"),
            helper.make_node("Add", ["bk", "k0"], ["k"], name="k/Add"),
            helper.make_node("Add", ["q", "k"], ["y"], name="sum"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(wk, "wk"),
         numpy_helper.from_array(np.full(N, 0.5, np.float32), "bq"),
         numpy_helper.from_array(np.full(N, -0.25, np.float32), "bk")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = _activations(rng, 4)
    absmax = {"x": np.abs(x).reshape(-1, K).max(0)}
    dec, records = decompose_outliers(model, absmax, threshold=6, max_channels=32)
    assert [r["node"] for r in records] == ["q/MatMul", "k/MatMul"]
    ops = [n.op_type for n in dec.graph.node]
    assert ops.count("Mul") == 1 and ops.count("Gather") == 1
    users = {i: [n for n in dec.graph.node if i in n.input] for n in dec.graph.node for i in n.output}
    for name, bias_add in (("q/MatMul", "q/Add"), ("k/MatMul", "k/Add")):
        out = next(n for n in dec.graph.node if n.name == name).output[0]
        assert [n.name for n in users[out]] == [bias_add]
    src, path = tmp_path / "f.onnx", tmp_path / "d.onnx"
    onnx.save(model, str(src))
    onnx.save(dec, str(path))
    onnx.checker.check_model(dec)
    np.testing.assert_allclose(_run(path, x), _run(src, x), rtol=1e-5, atol=1e-5)


def test_a_split_that_barely_shrinks_the_range_is_not_made():
    rng = np.random.default_rng(4)
    model = _matmul_model(rng.normal(0, 0.1, (K, N)).astype(np.float32))
    a = np.ones(K, np.float32)
    a[[3, 9]] = [8.0, 7.0]  # both above 6x the median, but splitting off 3 alone would leave 7
    _, records = decompose_outliers(model, {"h": a}, threshold=6, max_channels=1, min_gain=1.5)
    assert records == []  # 8 / 7 < 1.5: not worth four more ops
    _, records = decompose_outliers(model, {"h": a}, threshold=6, max_channels=2, min_gain=1.5)
    assert records[0]["channels"] == 2 and records[0]["absmax_ratio"] == 8.0  # the largest, 8, over 1
