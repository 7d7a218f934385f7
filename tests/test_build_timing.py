"""Issue 12: one streamed calibration for every method, latencies timed in worker processes, the
noise-based sensitivity ranking, and the speed tolerance. Small ONNX models built in the tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_bias_correction import float_model, samples

from accelc.artifacts import Artifact
from accelc.errors import VerificationError
from accelc.passes.benchmark import Benchmark
from accelc.passes.calibration import MSE_CANDIDATES, collect_tables, entropy_threshold, mse_range, uniform_histogram
from accelc.timing import ISOLATION_IN_PROCESS, ISOLATION_PROCESS, TimedModel, time_models


class _Reader:
    def __init__(self, x: np.ndarray, batch: int):
        self.batches = iter([{"x": x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def _ort_table(model: Path, x: np.ndarray, method: str, tmp: Path, **extra):
    """What ONNX Runtime's own calibrator computes (all batches collected, then computed)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    cal = create_calibrator(
        model, None, augmented_model_path=str(tmp / f"aug-{method}.onnx"),
        calibrate_method=CalibrationMethod[method], extra_options=extra,
    )
    cal.collect_data(_Reader(x, 8))
    return cal.compute_data()


@pytest.mark.parametrize("symmetric", [False, True])
def test_one_streamed_collection_gives_onnxruntime_s_tables_for_every_method(tmp_path, symmetric):
    model = float_model(tmp_path / "float.onnx")
    x = samples(0, 40)["x"]
    x[3, 0, 0, 0] = 9.0  # an outlier, so that percentile and entropy clip and min-max does not
    ours = collect_tables(model, {"x": x}, ["x"], 8, ["minmax", "entropy", "percentile"],
                          {"symmetric": symmetric, "percentile": 99.9})
    extra = {"symmetric": symmetric}
    ref = {
        "minmax": _ort_table(model, x, "MinMax", tmp_path, **extra),
        "entropy": _ort_table(model, x, "Entropy", tmp_path, **extra, num_bins=512),
        "percentile": _ort_table(model, x, "Percentile", tmp_path, **extra, percentile=99.9),
    }
    for method, table in ref.items():
        assert set(ours[method].data) == set(table.data)
        for name, td in table.data.items():
            got = np.asarray(ours[method].data[name].range_value, dtype=np.float64).ravel()
            want = np.asarray(td.range_value, dtype=np.float64).ravel()
            assert np.allclose(got, want, rtol=1e-5, atol=1e-6), (method, name, got, want)
    # the methods differ on the outlier tensor, so the comparison above is not vacuous
    lo = {m: float(np.asarray(ours[m].data["x"].range_value[1]).ravel()[0]) for m in ours}
    assert lo["minmax"] == pytest.approx(9.0) and lo["percentile"] < 9.0


def test_entropy_threshold_equals_onnxruntime_s_loop():
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(0)
    for trial in range(6):
        data = np.concatenate([rng.normal(0, 1, 20000), rng.normal(0, 8, 50 * trial + 1)]).astype(np.float32)
        t = float(np.abs(data).max())
        hist, edges = np.histogram(data, 256, range=(-t, t))
        h = (hist, edges.astype(np.float32), data.min(), data.max(), np.float32(t))
        want = HistogramCollector.get_entropy_threshold(None, h, 64)
        got = entropy_threshold(h, 64)
        assert float(got[0]) == pytest.approx(float(want[0])) and float(got[1]) == pytest.approx(float(want[1]))


def _qdq_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """Mean squared error of u8 QuantizeLinear/DequantizeLinear of ``x`` with range [lo, hi]."""
    scale = (hi - lo) / 255
    zp = np.clip(np.round(-lo / scale), 0, 255)
    q = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
    return float(np.mean((x - q) ** 2))


def test_mse_range_beats_min_max_and_percentile_ranges_on_a_heavy_tail():
    rng = np.random.default_rng(3)
    x = np.concatenate([np.abs(rng.normal(0, 1, 200_000)), rng.normal(0, 0.2, 50_000), [40.0]]).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    t = max(abs(lo), abs(hi))
    hist, edges = np.histogram(x, 2048, range=(-t, t))
    a, b = mse_range(hist, edges, lo, hi)
    assert lo <= a <= 0 <= b < hi  # the lone 40 is clipped
    mse = _qdq_mse(x, a, b)
    p = float(np.percentile(np.abs(x), 99.999))
    assert mse < 0.9 * _qdq_mse(x, lo, hi) and mse <= _qdq_mse(x, -min(p, -lo), p)
    # no candidate of the same grid does better at the high end (the search found the minimum)
    grid = hi * np.linspace(1 / MSE_CANDIDATES, 1, MSE_CANDIDATES)
    assert mse <= min(_qdq_mse(x, a, g) for g in grid) * 1.02
    assert mse_range(np.zeros(2048), edges, 0.0, 0.0) == (0.0, 0.0)


def test_uniform_histogram_matches_numpy():
    a = np.random.default_rng(1).normal(0, 3, 100_000).astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    got, want = uniform_histogram(a, 2048, lo, hi), np.histogram(a, 2048, range=(lo, hi))[0]
    assert got.sum() == want.sum() == a.size
    # only values within float32 rounding of a bin edge may move to the neighbouring bin
    assert 0 < (got == want).mean() and np.abs(got - want).sum() <= a.size * 5e-4
    assert np.abs(np.cumsum(got) - np.cumsum(want)).max() <= 2


def _onnx_artifact(path: Path) -> Artifact:
    return Artifact("onnx", path.parent, path.name, "d")


def test_each_model_is_timed_in_a_process_of_its_own(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = float_model(tmp_path / "a" / "model.onnx"), float_model(tmp_path / "b" / "model.onnx")
    feeds = {"1": samples(0, 1), "4": samples(0, 4)}
    got = time_models([TimedModel("a", artifact=_onnx_artifact(a)), TimedModel("b", artifact=_onnx_artifact(b))],
                      feeds, threads=1, warmup=2, iterations=5)
    pids = {got[k].pid for k in ("a", "b")}
    assert len(pids) == 2 and os.getpid() not in pids
    for t in got.values():
        assert t.error is None and t.isolation == ISOLATION_PROCESS
        assert set(t.times) == {"1", "4"} and all(len(v) == 5 and min(v) > 0 for v in t.times.values())
    # trial sessions may share one worker, one session alive at a time
    shared = time_models([TimedModel("a", onnx=a), TimedModel("b", onnx=b)], {"1": samples(0, 1)},
                         threads=1, warmup=1, iterations=3, share_process=True)
    assert shared["a"].pid == shared["b"].pid != os.getpid() and shared["a"].p50_ms("1") > 0


def test_a_kind_no_worker_plugin_runs_is_timed_in_process_and_says_so(tmp_path):
    (tmp_path / "m").mkdir()
    path = float_model(tmp_path / "m" / "model.onnx")

    class Runners:
        def make(self, artifact, device="cpu", threads=None):
            from accelc.passes.onnxruntime import ort_trial_session

            return ort_trial_session(artifact.file, threads)

    art = Artifact("test.private-kind", path.parent, path.name, "d")
    got = time_models([TimedModel("m", artifact=art)], {"1": samples(0, 1)}, threads=1, warmup=1, iterations=3,
                      runners=Runners())["m"]
    assert got.isolation == ISOLATION_IN_PROCESS and got.pid == os.getpid() and "test.private-kind" in got.note
    assert len(got.times["1"]) == 3
    # without a fallback the error is reported, not raised
    alone = time_models([TimedModel("m", artifact=art)], {"1": samples(0, 1)}, threads=1, warmup=1, iterations=3)
    assert alone["m"].error and "test.private-kind" in alone["m"].error and not alone["m"].times


def _chain(path: Path, loud: str) -> Path:
    """x (N, 4, 6, 6) -> conv_a -> relu -> conv_b -> relu -> conv_c: three 1x1 convs. The one named
    ``loud`` has a weight of 60 on an input channel that is almost always near zero (the test's input
    channel 0 is scaled by 0.01; before conv_b/conv_c the previous conv's output channel 0 is made
    tiny), so that weight sets each channel's INT8 scale (0.47) while the output comes from the
    other weights, which INT8 rounds to a few levels: that conv adds far more noise than the others."""
    rng = np.random.default_rng(0)
    order = ("conv_a", "conv_b", "conv_c")
    inits, nodes, prev = [], [], "x"
    for k, name in enumerate(order):
        w = rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32)
        if name == loud:
            w[:, 0, 0, 0] = 60.0
        if k + 1 < len(order) and order[k + 1] == loud:
            w[0] *= 0.01
        inits += [numpy_helper.from_array(w, f"{name}.w"),
                  numpy_helper.from_array(np.zeros(4, np.float32), f"{name}.b")]
        nodes.append(helper.make_node("Conv", [prev, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name))
        prev = f"{name}.y"
        if name != "conv_c":
            nodes.append(helper.make_node("Relu", [prev], [f"{name}.r"], name=f"{name}_relu"))
            prev = f"{name}.r"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


@pytest.mark.parametrize("loud", ["conv_a", "conv_b", "conv_c"])
def test_sqnr_ranking_puts_the_conv_that_adds_the_noise_first(tmp_path, loud):
    from onnxruntime.quantization.calibrate import save_tensors_data

    from accelc.passes.quantizer import quantize_model, quantized_op_types
    from accelc.passes.sensitivity import fallback_units, rank_units_sqnr

    model = _chain(tmp_path / "f.onnx", loud)
    x = {"x": np.random.default_rng(1).uniform(0, 1, (16, 4, 6, 6)).astype(np.float32)}
    x["x"][:, 0] *= 0.01
    tables = collect_tables(model, x, ["x"], 8, ["minmax"], {})
    save_tensors_data(tables["minmax"], tmp_path / "t.json")
    q = quantize_model(model, tmp_path / "t.json", tmp_path / "q.onnx", {"bias_correction": False})
    fm, qm = onnx.load(str(model)), onnx.load(str(q))
    units = fallback_units(fm, qm, quantized_op_types({}))
    rows = rank_units_sqnr(units, fm, qm, x, ["x"], 8, 1)
    assert [r["node"] for r in rows][0] == loud
    assert {r["node"] for r in rows} == {"conv_a", "conv_b", "conv_c"}
    assert rows[0]["added_nsr"] > 10 * rows[1]["added_nsr"]


def _bench(p50: float, float_p50: float | None) -> dict:
    m = {"batch": {"1": {"p50_ms": p50}}}
    if float_p50 is not None:
        m["baselines"] = {"float": {"kind": "onnx", "p50_ms": float_p50}}
    return m


def test_min_speedup_fails_a_build_whose_artifact_is_not_fast_enough():
    b = Benchmark()
    b.check(_bench(2.0, 5.0), {"min_speedup": 2.5})  # 2.5x: holds
    b.check(_bench(4.0, 3.0), {})  # no tolerance: nothing checked
    with pytest.raises(VerificationError, match=r"1\.25x .*requires 2x"):
        b.check(_bench(4.0, 5.0), {"min_speedup": 2})
    with pytest.raises(VerificationError, match="cannot be checked"):
        b.check(_bench(4.0, None), {"min_speedup": 1})
    assert "min_speedup" in Benchmark.key_ignores  # a tolerance: changing it reruns no benchmark


def _report(artifact_ms: float, float_ms: float, source_ms: float) -> dict:
    bench = {"batch": {"1": {"p50_ms": artifact_ms, "p99_ms": artifact_ms * 1.2}},
             "baselines": {"float": {"kind": "onnx", "p50_ms": float_ms, "p99_ms": float_ms},
                           "source": {"kind": "torch.module", "p50_ms": source_ms, "p99_ms": source_ms}}}
    verify = {"samples": 96, "top1_agreement": 0.9583, "cosine": 0.99816}
    stage = {"status": "ok", "cached": False, "seconds": 1.0, "error": None}
    return {
        "precision": "int8", "error": None, "status": "ok",
        "stages": [{**stage, "node": "quantize", "pass": "quantize", "seconds": 30.0,
                    "metrics": {"timing_s": {"sensitivity": 12.0, "fallback trials": 15.0}}},
                   {**stage, "node": "verify[quantize]", "pass": "verify", "metrics": verify},
                   {**stage, "node": "benchmark", "pass": "benchmark", "seconds": 9.0, "metrics": bench}],
    }


def test_report_opens_with_precision_speedups_and_agreement_and_warns_when_int8_is_slower():
    from accelc.report import _warnings, build_time_markdown, headline

    line = headline(_report(3.5, 7.0, 28.0))
    assert line == ("INT8 · 8.00x faster than the source model (eager PyTorch), 2.00x faster than FP32 ONNX "
                    "(batch 1, p50) · top-1 agreement 0.958, cosine 0.9982 (verify[quantize])")
    assert not any("slower" in w for w in _warnings(_report(3.5, 7.0, 28.0)))
    slow = _report(8.0, 7.0, 28.0)
    assert "1.14x slower than FP32 ONNX" in headline(slow)
    assert any("slower than the FP32 ONNX model" in w and "min_speedup" in w for w in _warnings(slow))
    table = "\n".join(build_time_markdown(slow))
    assert "| `quantize` | 30.00 | 75% | fallback trials 15.0, sensitivity 12.0 |" in table


def test_verify_min_speedup_fails_the_build_and_changing_it_reruns_nothing(tmp_path):
    from builders import write_tiny_recipe

    from accelc.build import build

    cache = tmp_path / "cache"
    ok = build(write_tiny_recipe(tmp_path, "a.yaml", verify={"min_speedup": 0.01}), out_dir=tmp_path / "a",
               cache_dir=cache)
    assert ok.ok, ok.result.failure
    bench = next(s for s in ok.report["stages"] if s["node"] == "benchmark")
    assert bench["metrics"]["isolation"] == ISOLATION_PROCESS
    assert bench["metrics"]["baselines"]["float"]["isolation"] == ISOLATION_PROCESS
    strict = build(write_tiny_recipe(tmp_path, "b.yaml", verify={"min_speedup": 1000}), out_dir=tmp_path / "b",
                   cache_dir=cache)
    assert not strict.ok and "verify.min_speedup requires 1000x" in str(strict.result.failure)
    assert all(s["cached"] for s in strict.report["stages"])  # a speed tolerance is checked, not rebuilt


def test_plots_of_unchanged_data_are_copied_not_drawn(tmp_path, monkeypatch):
    from accelc import plots

    report = _report(3.5, 7.0, 28.0)
    report["stages"][2]["metrics"]["batch"]["1"]["latencies_ms"] = [3.4, 3.5, 3.6, 3.5, 3.9] * 4
    first, second, third = (tmp_path / n for n in ("g1", "g2", "g3"))
    for d in (first, second, third):
        d.mkdir()
    drawn = plots.write_plots(first, report)
    assert drawn == {"latency_batch1": "latency_batch1.png"}

    def fail(*_a):
        raise AssertionError("drew a plot whose data did not change")

    monkeypatch.setattr(plots, "_latency", fail)
    assert plots.write_plots(second, report, previous=first) == drawn
    assert (second / "latency_batch1.png").read_bytes() == (first / "latency_batch1.png").read_bytes()
    report["stages"][2]["metrics"]["batch"]["1"]["latencies_ms"][0] = 9.0  # new data: drawn again
    with pytest.raises(AssertionError, match="drew a plot"):
        plots.write_plots(third, report, previous=second)


def test_the_trials_plot_shows_the_metric_whose_tolerance_decided_the_search():
    from accelc.plots import _plotted_metric

    trials = [{"top1_agreement": 0.92, "cosine": 0.9968}, {"top1_agreement": 0.95, "cosine": 0.9982}]
    assert _plotted_metric(trials, {"cosine": 0.998, "top1_agreement": 0.9}) == "cosine"
    assert _plotted_metric(trials, {"cosine": 0.99, "top1_agreement": 0.94}) == "top1_agreement"
    assert _plotted_metric(trials, {}) == "top1_agreement"
    assert _plotted_metric([{"cosine": 0.99}], {"top1_agreement": 0.9}) == "cosine"  # embeddings: no top-1
