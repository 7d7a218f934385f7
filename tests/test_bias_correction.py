"""Empirical bias correction: the per-channel output means of the QDQ model match the float model's.

The unit tests build a float ONNX model in the test whose weights INT8 rounds with a
systematic error: every channel has one large weight, which sets the per-channel scale, and
small positive weights at 0.45 of a quantization step, which all round to zero. On inputs
with a positive mean that drops a fixed amount from every output channel, which is exactly
what bias correction exists to undo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_accuracy_aware_int8 import QUICK, stage, write_project

from accelc.build import build, prepare
from accelc.errors import PassError
from accelc.passes.bias_correction import correct_bias, recorded_correction
from accelc.passes.quantizer import quantize_model

STEP = 0.01  # per-channel weight scale


def _weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random whole steps plus 0.45 of a step, which INT8 rounds away (always downwards); one weight of
    127 steps per output channel, at a random tap, sets the channel's scale to ``STEP``."""
    w = ((rng.integers(-40, 40, shape) + 0.45) * STEP).astype(np.float32)
    flat = w.reshape(shape[0], -1)
    flat[np.arange(shape[0]), rng.integers(0, flat.shape[1], shape[0])] = 127 * STEP
    return w


def float_model(path: Path, batch: int | str = "N") -> Path:
    """(N, 3, 8, 8) float32 -> (N, 5): Conv 3->8 3x3, Relu, Conv 8->8 1x1, GlobalAveragePool, Flatten, Gemm 8->5.
    ``batch``: the batch dimension, symbolic (default) or static."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(_weights(rng, (8, 3, 3, 3)), "w1"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
        numpy_helper.from_array(_weights(rng, (8, 8, 1, 1)), "w2"),
        numpy_helper.from_array(np.full(8, 0.1, np.float32), "b2"),
        numpy_helper.from_array(_weights(rng, (5, 8)), "w3"),
        numpy_helper.from_array(np.zeros(5, np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "systematic_rounding",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def samples(seed: int, n: int = 32) -> dict[str, np.ndarray]:
    """Inputs with a positive mean (as after a ReLU), ``(n, 3, 8, 8)`` float32."""
    return {"x": np.random.default_rng(seed).uniform(0.0, 1.0, (n, 3, 8, 8)).astype(np.float32)}


def table(model: Path, data: dict[str, np.ndarray], tmp: Path) -> Path:
    from onnxruntime.quantization.calibrate import CalibrationDataReader, create_calibrator, save_tensors_data

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": data["x"][i : i + 4]} for i in range(0, len(data["x"]), 4)])

        def get_next(self):
            return next(self.batches, None)

    cal = create_calibrator(model, None, augmented_model_path=str(tmp / "augmented.onnx"))
    cal.collect_data(Reader())
    save_tensors_data(cal.compute_data(), tmp / "table.json")
    return tmp / "table.json"


def run(model: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]).run(None, data)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bias")
    fp = float_model(tmp / "float.onnx")
    cal = samples(0)
    tab = table(fp, cal, tmp)
    plain = quantize_model(fp, tab, tmp / "plain.onnx", {"bias_correction": False})
    corrected = quantize_model(fp, tab, tmp / "corrected.onnx", {}, calibration=cal)
    return fp, plain, corrected, cal, tab, tmp


def test_corrected_model_matches_the_float_channel_means(models):
    fp, plain, corrected, cal, _, _ = models
    held_out = samples(1)  # not the calibration samples: the correction must carry over
    for data in (cal, held_out):
        ref = run(fp, data).mean(0)
        before = np.abs(run(plain, data).mean(0) - ref).max()
        after = np.abs(run(corrected, data).mean(0) - ref).max()
        assert before > 0.05  # the systematic rounding error is there to correct
        assert after < before / 10


def test_only_the_int32_biases_change_and_the_correction_is_recorded(models):
    _, plain, corrected, cal, _, _ = models
    a, b = onnx.load(str(plain)), onnx.load(str(corrected))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    changed = sorted(k for k in ia if not np.array_equal(ia[k], ib[k]))
    producer = {o: n for n in b.graph.node for o in n.output}
    biases = sorted(producer[n.input[2]].input[0] for n in b.graph.node if n.op_type in ("Conv", "Gemm"))
    assert changed == biases and len(biases) == 3 and all(ib[k].dtype == np.int32 for k in changed)
    rec = recorded_correction(b)
    assert rec["layers"] == 3 and rec["samples"] == len(cal["x"]) and rec["max_shift"] > 0.02
    assert rec["kept"] and rec["error_after"] < rec["error_before"]
    assert recorded_correction(a) is None


def test_a_correction_that_moves_away_from_float_is_not_kept(models, monkeypatch):
    """The safeguard: made to aim at wrong means (+1 on every channel), the correction worsens the outputs,
    so the biases are restored and the record says so."""
    import accelc.passes.bias_correction as bc

    fp, plain, _, cal, _, tmp = models
    real = bc._float_stats
    bc._FLOAT_STATS.clear()

    def wrong_reference(*args, **kwargs):
        means, out, samples, runs = real(*args, **kwargs)
        wrong = [{k: m + 1.0 for k, m in run.items()} for run in runs]
        return {k: m + 1.0 for k, m in means.items()}, out, samples, wrong

    monkeypatch.setattr(bc, "_float_stats", wrong_reference)
    copy = tmp / "wrong.onnx"
    copy.write_bytes(plain.read_bytes())
    result = correct_bias(fp, copy, cal)
    assert not result.kept and result.layers == [] and result.error_after > result.error_before
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(plain)).graph.initializer}
    after = onnx.load(str(copy))
    assert all(np.array_equal(before[t.name], numpy_helper.to_array(t)) for t in after.graph.initializer)
    assert recorded_correction(after)["kept"] is False


def test_float_nodes_are_left_alone(models):
    fp, _, _, cal, tab, tmp = models
    out = quantize_model(fp, tab, tmp / "excluded.onnx", {"nodes_to_exclude": ["conv2"]}, calibration=cal)
    q = onnx.load(str(out))
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    b2 = next(t for t in q.graph.initializer if t.name == conv2.input[2])
    assert numpy_helper.to_array(b2).tolist() == pytest.approx([0.1] * 8)  # the float bias, as exported
    assert recorded_correction(q)["layers"] == 2


def test_correct_bias_reports_layers_in_topological_order(models):
    fp, plain, _, cal, _, tmp = models
    copy = tmp / "copy.onnx"
    copy.write_bytes(plain.read_bytes())
    result = correct_bias(fp, copy, cal)
    assert result.layers == ["conv1", "conv2", "fc"] and result.samples == 32 and result.seconds > 0


def test_a_static_batch_model_is_corrected_in_whole_batches(tmp_path):
    fp = float_model(tmp_path / "static.onnx", batch=4)
    cal = samples(0, n=10)
    tab = table(fp, {"x": cal["x"][:8]}, tmp_path)
    out = quantize_model(fp, tab, tmp_path / "q.onnx", {}, calibration=cal)
    rec = recorded_correction(onnx.load(str(out)))
    assert rec["samples"] == 8 and rec["layers"] == 3 and rec["kept"]


def test_bias_correction_without_calibration_samples_is_a_clear_error(models):
    fp, _, _, _, tab, tmp = models
    with pytest.raises(PassError, match="bias_correction needs the calibration samples"):
        quantize_model(fp, tab, tmp / "nodata.onnx", {})


def test_plain_quantize_reads_the_calibration_set_only_for_bias_correction(tmp_path):
    on = write_project(tmp_path, "on.yaml", quantize={"bias_correction": True})
    off = write_project(tmp_path, "off.yaml")
    assert set(prepare(on)[0].by_id["quantize"].inputs) == {"model", "table", "calibration"}
    assert set(prepare(off)[0].by_id["quantize"].inputs) == {"model", "table"}


def test_bias_correction_rescues_most_of_the_wiped_channels_in_a_build(tmp_path):
    """The deliberately sensitive net of test_accuracy_aware_int8: full INT8 with and without correction."""
    cosine = {}
    for bc in (False, True):
        recipe = write_project(
            tmp_path / str(bc), quantize={"bias_correction": bc, **QUICK}, tolerances={"cosine": 0.0}
        )
        outcome = build(recipe, out_dir=tmp_path / str(bc) / "out", cache_dir=tmp_path / "cache")
        assert outcome.ok, outcome.result.failure
        cosine[bc] = stage(outcome.report, "verify[quantize]")["metrics"]["cosine"]
        q = stage(outcome.report, "quantize")["metrics"]
        assert ("bias_correction" in q) is bc
    assert cosine[False] < 0.8 and cosine[True] > 0.99


def test_one_run_measures_the_same_shifts_as_correcting_layer_by_layer(models, monkeypatch):
    """The in-graph re-centring (one run) equals the paper's sequential method: each layer measured
    after every earlier layer's bias was corrected, one partial run per layer."""
    from accelc.passes import bias_correction as bc

    monkeypatch.setattr(bc, "SHIFT_BATCH", 1024)  # the whole set in one run, as the reference

    fp, plain, _, cal, _, _ = models
    f, q = onnx.load(str(fp)), onnx.load(str(plain))
    float_out = {n.name: n.output[0] for n in f.graph.node}
    tensors = [(float_out["conv1"], 4), (float_out["conv2"], 4), (float_out["fc"], 2)]
    runs: list = []
    means, _, _ = bc._measure(f, tensors, cal, 1024, 1, None, runs)
    fmean = dict(zip(["conv1", "conv2", "fc"], means, strict=True))
    float_runs = [{t: m for (t, _), m in zip(tensors, run, strict=True)} for run in runs]
    layers = [n for n in q.graph.node if n.op_type in ("Conv", "Gemm")]
    one_run = bc._sequential_shifts(
        q, [(n, 4 if n.op_type == "Conv" else 2, float_out[n.name]) for n in layers], float_runs, cal, 1, None
    )
    # reference: correct layer by layer, each measured on the model with the earlier ones corrected
    producer = {o: n for n in q.graph.node for o in n.output}
    inits = {t.name: t for t in q.graph.initializer}
    seq = []
    for n in layers:
        (mean,), _, _ = bc._measure(q, [(n.output[0], 4 if n.op_type == "Conv" else 2)], cal, 8, 1, None)
        delta = fmean[n.name] - mean
        seq.append(delta)
        dq = producer[n.input[2]]
        bias, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(bias).astype(np.int64) + np.round(delta / scale).astype(np.int64)
        bias.CopyFrom(numpy_helper.from_array(b.astype(np.int32), bias.name))
    assert np.abs(seq[0]).max() > 0.04  # there is a shift to measure
    for a, b in zip(one_run, seq, strict=True):
        # equal up to the rounding of each correction to whole bias steps (input scale x weight scale)
        assert np.allclose(a, b, atol=2e-3), (a, b)


def test_runs_of_a_few_samples_correct_as_well_as_one_run_of_all(models, monkeypatch):
    """Each run is re-centred on the float model's means over the same samples, so splitting the
    set into runs (to bound memory) keeps the correction; against the whole set's means it would not."""
    from accelc.passes import bias_correction as bc

    fp, plain, _, cal, _, tmp = models
    errors = {}
    for shift_batch in (1024, 8):
        monkeypatch.setattr(bc, "SHIFT_BATCH", shift_batch)
        copy = tmp / f"runs{shift_batch}.onnx"
        copy.write_bytes(plain.read_bytes())
        r = correct_bias(fp, copy, cal)
        assert r.kept
        errors[shift_batch] = (r.error_before, r.error_after)
    assert errors[8][1] < errors[8][0] / 2
    assert errors[8][1] == pytest.approx(errors[1024][1], rel=0.2)
