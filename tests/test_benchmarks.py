"""The comparison benchmark: its pure helpers (benchmarks/summary.py: statistics, ratios, targets,
table, Markdown and JSON shapes) on small fake data, and its per-process timing (benchmarks/workers.py,
benchmarks/compare.py, benchmarks/transformer_variants.py) with fake workers, an in-process worker
and one run of real worker processes on a tiny model. No timing is asserted."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest


def _load_summary():
    """benchmarks/ is a script folder at the repo root, not an installed package: load the module
    by path rather than putting the repo root (and its compiler/, passes/ folders) on sys.path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "summary.py"
    spec = importlib.util.spec_from_file_location("benchmarks_summary", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


S = _load_summary()
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmarks(module: str):
    """``benchmarks.<module>``, with the ``benchmarks`` package imported from its folder by path
    (as for ``_load_summary``: the repo root does not go on sys.path)."""
    if "benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", BENCHMARKS / "__init__.py", submodule_search_locations=[str(BENCHMARKS)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"benchmarks.{module}")


def _variant(p50_ms: float, tput: float, top1: float = 1.0, **extra):
    v = {
        "label": "x",
        "status": "ok",
        "reason": None,
        "verified": None,
        "latency": S.latency_summary([[p50_ms / 1e3] * 5, [p50_ms / 1e3] * 5]),
        "throughput": S.throughput_summary([[8 / tput] * 2, [8 / tput] * 2], 8),
        "peak_rss_mib": 100.0,
        "quality": {
            "samples": 96,
            "top1_agreement": top1,
            "cosine": 0.999,
            "cosine_min": 0.99,
            "max_abs_error": 0.1,
        },
        "build": {"cold_s": None, "warm_s": None, "note": ""},
    }
    v.update(extra)
    return v


def _recipe(name="efficientnet_lite0_cpu_int8", **accelc_extra):
    return {
        "recipe": name,
        "device": "cpu",
        "status": "ok",
        "batch": 8,
        "notes": [],
        "variants": {
            "eager": _variant(20.0, 60.0),
            "compile": _variant(10.0, 100.0),
            "ort_fp32": _variant(5.0, 300.0),
            "ort_int8_qs": _variant(4.0, 250.0, top1=0.9),
            "accelc": _variant(
                2.0,
                500.0,
                top1=0.99,
                **{"verified": True, "build": {"cold_s": 16.0, "warm_s": 0.4}, **accelc_extra},
            ),
        },
    }


def test_round_order_rotates_so_every_variant_leads_once():
    names = ["a", "b", "c"]
    orders = [S.round_order(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert S.round_order(names, 3) == names
    assert S.round_order([], 5) == []


def test_latency_summary_takes_median_of_round_medians_and_pooled_p99():
    rounds = [[0.001, 0.002, 0.003], [0.010, 0.010, 0.010], [0.002, 0.002, 0.002]]
    s = S.latency_summary(rounds)
    assert s["p50_ms"] == pytest.approx(2.0)  # medians 2, 10, 2 -> 2: one disturbed round does not move it
    assert (s["p50_min_ms"], s["p50_max_ms"]) == pytest.approx((2.0, 10.0))
    assert s["spread_pct"] == pytest.approx(400.0)
    assert s["rounds"] == 3 and s["iterations"] == 9
    assert s["p99_ms"] == pytest.approx(10.0)
    assert s["p99_min_ms"] <= s["p99_max_ms"]


def test_latency_summary_rejects_empty_timings():
    with pytest.raises(ValueError):
        S.latency_summary([[], []])


def test_throughput_summary_is_batch_over_mean_time_per_round():
    s = S.throughput_summary([[0.1, 0.1], [0.2, 0.2], [0.1, 0.3]], batch=8)
    assert s["samples_per_s"] == pytest.approx(40.0)  # rounds: 80, 40, 40
    assert (s["min"], s["max"]) == pytest.approx((40.0, 80.0))
    assert s["batch"] == 8 and s["iterations"] == 6


def test_ratio_is_times_better_for_latency_and_throughput():
    assert S.ratio(20.0, 5.0, higher_is_better=False) == pytest.approx(4.0)
    assert S.ratio(100.0, 250.0, higher_is_better=True) == pytest.approx(2.5)
    assert S.ratio(None, 5.0, False) is None
    assert S.ratio(20.0, 0.0, False) is None


def test_best_alternative_excludes_accelc_and_missing_values():
    p50 = {"eager": 20.0, "ort_fp32": 5.0, "ort_int8_qs": None, "accelc": 1.0}
    assert S.best_alternative(p50, higher_is_better=False) == "ort_fp32"
    assert S.best_alternative({"eager": 1.0, "accelc": 9.0}, higher_is_better=True) == "eager"
    assert S.best_alternative({"accelc": 1.0}, higher_is_better=False) is None


def test_finish_recipe_adds_ratios_best_alternative_and_targets():
    r = S.finish_recipe(_recipe())
    assert r["best_alternative"] == {"latency": "ort_int8_qs", "throughput": "ort_fp32"}
    acc = r["variants"]["accelc"]["ratios"]
    assert acc["p50_vs_eager"] == pytest.approx(10.0)
    assert acc["p50_vs_best_alt"] == pytest.approx(2.0)
    assert acc["throughput_vs_eager"] == pytest.approx(500 / 60)
    assert acc["throughput_vs_best_alt"] == pytest.approx(500 / 300)
    assert r["variants"]["ort_int8_qs"]["ratios"]["p50_vs_best_alt"] == pytest.approx(1.0)
    met = {t["metric"]: t["met"] for t in r["targets"]}
    assert met == {
        "verified": True,
        "warm_build_s": True,
        "speedup_vs_eager": True,
        "p50_vs_quantize_static": True,
        "top1_agreement": True,
    }


def test_targets_report_misses_and_unmeasured_values():
    r = _recipe(verified=False)
    r["variants"]["accelc"]["quality"]["top1_agreement"] = 0.75
    r["variants"]["accelc"]["latency"] = S.latency_summary([[0.005]])  # 4x eager, slower than quantize_static
    r["variants"]["accelc"]["build"]["warm_s"] = None
    met = {t["metric"]: t["met"] for t in S.finish_recipe(r)["targets"]}
    assert met == {
        "verified": False,
        "warm_build_s": None,
        "speedup_vs_eager": False,
        "p50_vs_quantize_static": False,
        "top1_agreement": False,
    }
    lines = S.target_lines(r)
    assert any(line.startswith("MISSED") and "0.75" in line for line in lines)
    assert any(line.startswith("not measured") for line in lines)


def test_recipes_without_targets_get_the_common_ones():
    r = S.finish_recipe(_recipe(name="some_fp32_recipe"))
    assert [t["metric"] for t in r["targets"]] == ["verified", "warm_build_s"]


def test_every_cpu_recipe_of_a_model_gets_its_targets_whatever_the_runtime():
    names = {t.metric for t in S.targets_for("resnet18_cpu_openvino_int8")}
    assert {"speedup_vs_eager", "top1_agreement", "verified"} <= names
    assert S.targets_for("efficientnet_lite0_cpu_openvino_int8") == S.targets_for("efficientnet_lite0_cpu_int8")
    assert S.targets_for("resnet18_t4_int8") == S.COMMON_TARGETS


def test_table_rows_follow_variant_order_and_mark_unverified_artifacts():
    r = S.finish_recipe(_recipe(verified=False))
    del r["variants"]["compile"]
    header, rows = S.table_rows(r)
    assert header[0] == "variant" and len(header) == 1 + len(S.COLUMNS)
    assert "bs8 samples/s (range)" in header
    assert [row[0] for row in rows] == [
        "eager FP32",
        "ORT FP32",
        "ORT INT8 quantize_static",
        "accelc (UNVERIFIED)",
    ]
    assert all(len(row) == len(header) for row in rows)
    eager, acc = rows[0], rows[-1]
    assert eager[header.index("p50 ×eager")] == "1.00×"
    assert acc[header.index("p50 ×eager")] == "10.00×"
    assert acc[header.index("build s cold / warm")] == "16.0 / 0.40"
    assert eager[header.index("build s cold / warm")] == S.DASH


def test_speed_and_cost_columns_split_the_full_table():
    assert S.SPEED_COLUMNS + S.COST_COLUMNS == tuple(S.COLUMNS)


def test_markdown_has_machine_table_targets_and_skips():
    doc = {
        "date": "2026-01-01 00:00 UTC",
        "machine": {
            "cpu": "Test CPU",
            "cpu_family_model": "family 25, model 17",
            "cpus": 2,
            "avx512_vnni": True,
            "torch": "t",
            "onnxruntime": "o",
        },
        "threads": 2,
        "settings": {"rounds": 3, "iterations": 10, "throughput_iterations": 2, "warmup": 4, "throughput_warmup": 1,
                     "quick": True},
        "conditions": "busy machine",
        "recipes": [
            S.finish_recipe(_recipe()),
            {"recipe": "resnet18_t4_int8", "status": "skipped", "reason": "no CUDA GPU"},
        ],
    }
    md = S.render_markdown(doc)
    assert "Test CPU (family 25, model 17) (2 CPUs, AVX-512 VNNI), 2 threads" in md
    assert "quick smoke run" in md and "Conditions: busy machine" in md
    assert "Each variant timed alone in a process of its own, 3 rounds alternating the processes" in md
    assert "4 warm-up and 10 timed batch-1 calls, then 1 warm-up and 2 timed larger-batch calls" in md
    assert "| variant | bs1 p50 ms (range) |" in md
    assert "**resnet18_t4_int8**: skipped: no CUDA GPU" in md
    assert "- met: batch-1 p50 at least 8x faster than eager FP32" in md


def test_markdown_table_escapes_pipes():
    text = S.markdown_table(["a", "b"], [["x|y", "z"]])
    assert text.splitlines() == ["| a | b |", "| --- | --- |", "| x\\|y | z |"]


def test_to_json_is_strict_json_with_nulls_for_non_finite_numbers():
    import numpy as np

    doc = {"schema": S.SCHEMA_VERSION, "a": float("nan"), "b": [np.float32(1.5), float("inf")], "c": (1, 2)}
    back = json.loads(S.to_json(doc))
    assert back == {"schema": S.SCHEMA_VERSION, "a": None, "b": [1.5, None], "c": [1, 2]}


def test_ort_profile_summary_groups_by_operator_type_and_drops_the_cold_first_run():
    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 9000},  # cold: left out
        node("conv1", "QLinearConv", 10, 8000),
        {"cat": "Session", "name": "model_run", "ts": 10000, "dur": 3000},
        node("conv1", "QLinearConv", 10010, 1000),
        node("conv2", "QLinearConv", 10020, 1500),
        node("add", "Add", 10030, 300),
        {"cat": "Session", "name": "model_run", "ts": 20000, "dur": 5000},
        node("conv1", "QLinearConv", 20010, 3000),
        node("conv2", "QLinearConv", 20020, 1500),
        node("add", "Add", 20030, 500),
        {"cat": "Node", "name": "conv1_fence_before", "ts": 20040, "dur": 50, "args": {"op_name": "QLinearConv"}},
    ]
    p = S.ort_profile_summary(events)
    assert p["runs"] == 2
    assert p["run_ms"] == pytest.approx(4.0)
    assert p["kernels_ms"] == pytest.approx((1.0 + 1.5 + 0.3 + 3.0 + 1.5 + 0.5) / 2)
    assert p["kernels_min_ms"] == pytest.approx(1.0 + 1.5 + 0.3)
    assert p["conv_min_ms"] == pytest.approx(2.5)
    assert p["overhead_ms"] == pytest.approx(4.0 - p["kernels_ms"])
    assert [(o["op"], o["nodes"]) for o in p["ops"]] == [("QLinearConv", 2), ("Add", 1)]
    assert p["ops"][0]["ms"] == pytest.approx(3.5)
    assert p["ops"][0]["min_ms"] == pytest.approx(2.5)


def test_ov_profile_summary_splits_layers_by_kernel_precision():
    from datetime import timedelta
    from types import SimpleNamespace

    def layer(name, typ, exec_type, us, status="Status.EXECUTED"):
        return SimpleNamespace(
            node_name=name, node_type=typ, exec_type=exec_type, status=status, real_time=timedelta(microseconds=us)
        )

    runs = [
        [
            layer("stem", "Convolution", "jit_avx512_FP32", 400),
            layer("dw", "GroupConvolution", "brgconv_avx512_dw_I8", 100),
            layer("fc", "FullyConnected", "brgemm_avx512_I8", 50),
            layer("in", "Parameter", "unknown_f32", 0, status="Status.NOT_RUN"),
            layer("out", "Result", "undef", 5),
        ],
        [
            layer("stem", "Convolution", "jit_avx512_FP32", 600),
            layer("dw", "GroupConvolution", "brgconv_avx512_dw_I8", 100),
            layer("fc", "FullyConnected", "brgemm_avx512_I8", 70),
            layer("out", "Result", "undef", 5),
        ],
    ]
    p = S.ov_profile_summary(runs, [1.0, 1.2])
    ops = {o["op"]: o for o in p["ops"]}
    assert set(ops) == {"Convolution (fp32)", "GroupConvolution (i8)", "FullyConnected (i8)", "Result"}
    assert ops["Convolution (fp32)"]["ms"] == pytest.approx(0.5)
    assert ops["Convolution (fp32)"]["min_ms"] == pytest.approx(0.4)
    assert p["conv_min_ms"] == pytest.approx(0.4 + 0.1 + 0.05)
    assert p["kernels_ms"] == pytest.approx((0.555 + 0.775) / 2)
    assert p["run_ms"] == pytest.approx(1.1)
    assert p["overhead_ms"] == pytest.approx(1.1 - p["kernels_ms"])


def test_op_profile_sum_of_minimums_ignores_a_disturbed_run():
    per_node = {("aten::conv2d", "0"): [1000.0, 9000.0], ("aten::relu_", "1"): [100.0, 100.0]}
    p = S.op_profile(per_node, runs=2)
    assert p["kernels_min_ms"] == pytest.approx(1.1)
    assert p["kernels_ms"] == pytest.approx(5.1)
    assert p["conv_min_ms"] == pytest.approx(1.0)
    assert p["ops"][0]["share_pct"] == pytest.approx(100 * 5.0 / 5.1)


def test_conv_gops_counts_two_operations_per_mac():
    assert S.conv_gops(1_000_000_000, 10.0) == pytest.approx(200.0)
    assert S.conv_gops(None, 10.0) is None and S.conv_gops(10, 0.0) is None


def test_profile_lines_compare_convolutions_with_the_matching_gemm_peak():
    r = _recipe()
    r["macs"] = 1_000_000_000
    r["gemm_peaks"] = {"int8_gops": 800.0, "fp32_gflops": 100.0}
    r["profile"] = {
        "eager": {"run_ms": 25.0, "kernels_ms": 24.0, "kernels_min_ms": 20.0, "conv_gops": 50.0, "ops": []},
        "accelc": {
            "run_ms": 3.0,
            "kernels_ms": 2.8,
            "kernels_min_ms": 2.5,
            "conv_gops": 400.0,
            "ops": [{"op": "QLinearConv", "ms": 2.6, "min_ms": 2.4, "share_pct": 93.0, "nodes": 20}],
        },
    }
    lines = S.profile_lines(r)
    assert lines[0].startswith("model: 1.000 GMAC")
    assert "INT8 800 GOP/s" in lines[1]
    assert "eager FP32" in lines[2] and "(50% of the GEMM peak)" in lines[2]
    assert "accelc" in lines[3] and "(50% of the GEMM peak)" in lines[3] and "QLinearConv 2.40" in lines[3]
    # bf16 kernels beat the FP32 peak by design: no percentage against it
    bf16_ops = [{"op": "Convolution (bf16)", "ms": 2.6, "min_ms": 2.4}]
    r["profile"]["ov_fp32"] = {**r["profile"]["accelc"], "ops": bf16_ops}
    ov = next(line for line in S.profile_lines(r) if line.startswith("OpenVINO default"))
    assert "convolutions 400 GOP/s" in ov and "% of the GEMM peak" not in ov


def test_margin_stats_measure_near_ties_behind_flipped_decisions():
    import numpy as np

    ref = np.array([[0.0, 1.0, 5.0], [2.0, 2.1, 0.0], [3.0, 0.0, 0.5]])
    out = np.array([[0.0, 1.0, 4.0], [2.2, 2.0, 0.0], [3.0, 0.0, 0.5]])
    m = S.margin_stats(ref, out)
    assert m["median"] == pytest.approx(2.5) and m["min"] == pytest.approx(0.1)
    assert m["flipped"] == 1 and m["max_flipped_gap"] == pytest.approx(0.1)
    assert S.margin_stats(ref, ref)["max_flipped_gap"] is None
    assert "flipped" not in S.margin_stats(ref)


def test_quality_lines_explain_only_variants_with_flips():
    r = _recipe()
    r["reference_margin"] = {"median": 2.0, "p10": 0.5, "min": 0.01}
    r["variants"]["accelc"]["quality"]["margin"] = {"flipped": 4, "max_flipped_gap": 0.05}
    r["variants"]["eager"]["quality"]["margin"] = {"flipped": 0, "max_flipped_gap": None}
    lines = S.quality_lines(r)
    assert len(lines) == 1 and lines[0].startswith("accelc: 4/96 samples flip")
    assert "0.050" in lines[0] and "2.000" in lines[0]


def test_pixel_step_noise_stays_within_half_a_step_per_channel():
    import numpy as np

    x = np.zeros((64, 3, 4, 4), np.float32)
    std = (0.5, 0.25, 0.229)
    noisy = S.pixel_step_noise(x, std, seed=1)
    assert noisy.dtype == np.float32 and noisy.shape == x.shape
    for c, s in enumerate(std):
        step = 1 / (255 * s)
        d = noisy[:, c]
        assert np.abs(d).max() <= 0.5 * step * (1 + 1e-6)
        assert np.abs(d).max() > 0.45 * step  # it uses the whole half step, not a sliver
    assert np.array_equal(noisy, S.pixel_step_noise(x, std, seed=1))  # seeded


def test_noise_floor_is_reported_under_the_table():
    recipe = {"noise_floor": {"steps": 0.5, "samples": 96, "top1_agreement": 0.8646, "cosine": 0.99646, "flipped": 13}}
    lines = [line for prefix, line in S.finding_lines(recipe) if prefix == "noise floor: "]
    assert lines == [
        "eager FP32 against itself with each input moved by up to ±0.5 of an 8-bit pixel step (as rounding a "
        "resized image to uint8 does): top-1 agreement 0.865, cosine 0.9965, 13/96 samples flip"
    ]
    assert S.noise_floor_line({}) == []


# --- each variant timed alone in a worker process of its own ---------------------------------------------


def _worker_result(pid: int, latency_ms: list[float], throughput_ms: list[float], rss: float, first=(0.5, 0.25)):
    return {
        "pid": pid,
        "load_s": 0.1,
        "threads": 2,
        "threads_in_use": {},
        "sets": {
            "latency": {"first_call_s": first[0], "times_s": [t / 1e3 for t in latency_ms], "peak_rss_mib": rss},
            "throughput": {"first_call_s": first[1], "times_s": [t / 1e3 for t in throughput_ms], "peak_rss_mib": rss},
        },
        "peak_rss_mib": rss,
        "children_peak_rss_mib": 0.0,
        "outputs": [],
    }


def test_time_in_processes_starts_one_worker_per_variant_per_round_in_rotated_order(tmp_path):
    W = _benchmarks("workers")
    calls = []

    def fake_run(args, env):
        spec = json.loads(Path(args[args.index("--spec") + 1]).read_text())
        name = args[args.index("--variant") + 1]
        calls.append((spec["round"], name, bool(spec["evaluate"])))
        if name == "c" and spec["round"] == 1:
            raise RuntimeError("ValueError: broke in its second process")
        if name == "d":
            raise RuntimeError("skipped: the openvino package is not installed")
        return _worker_result(1000 + len(calls), [1.0], [2.0], 10.0), 0.5

    evaluate = {n: [{"inputs": "x.npz", "out": f"{n}.npy", "batch": 2}] for n in "abcd"}
    r = W.time_in_processes(["a", "b", "c", "d"], {"threads": 2}, 3, tmp_path, evaluate=evaluate, run=fake_run)
    assert r.orders == [["a", "b", "c", "d"], ["b", "c", "a"], ["a", "b"]]
    assert [(rnd, n) for rnd, n, _ in calls] == [(0, "a"), (0, "b"), (0, "c"), (0, "d"), (1, "b"), (1, "c"),
                                                 (1, "a"), (2, "a"), (2, "b")]
    assert all(ev == (rnd == 0) for rnd, _, ev in calls)  # outputs are saved by the first round's worker only
    assert r.failures == {"c": "round 2: ValueError: broke in its second process",
                          "d": "skipped: the openvino package is not installed"}
    assert set(r.results) == {"a", "b"}
    assert [w["position"] for w in r.results["a"]] == [0, 2, 0]
    assert len({w["pid"] for ws in r.results.values() for w in ws}) == 6


def test_summarize_rounds_reports_median_of_per_round_medians_and_each_worker():
    C = _benchmarks("compare")
    W = _benchmarks("workers")
    rounds = W.Rounds(
        orders=[["eager", "compile"], ["compile", "eager"], ["eager", "compile"]],
        results={
            "eager": [
                {**_worker_result(11, [20, 21, 22], [100, 100], 500.0), "round": 0, "position": 0},
                {**_worker_result(12, [30, 30, 30], [200, 200], 520.0), "round": 1, "position": 1},
                {**_worker_result(13, [25, 26, 90], [100, 300], 510.0), "round": 2, "position": 0},
            ],
            "compile": [
                {**_worker_result(21, [5], [40], 900.0, first=(60.0, 30.0)), "round": 0, "position": 1},
                {**_worker_result(22, [6], [40], 800.0, first=(2.0, 1.0)), "round": 1, "position": 0},
                {**_worker_result(23, [7], [40], 850.0, first=(2.5, 1.0)), "round": 2, "position": 1},
            ],
        },
        failures={"ov_fp32": "skipped: the openvino package is not installed"},
    )
    vres = {name: C._empty_variant(name) for name in ("eager", "compile", "ov_fp32")}
    C.summarize_rounds(vres, rounds, batch=8)
    lat = vres["eager"]["latency"]
    assert lat["p50_per_round_ms"] == pytest.approx([21.0, 30.0, 26.0])
    assert lat["p50_ms"] == pytest.approx(26.0)
    assert (lat["p50_min_ms"], lat["p50_max_ms"]) == pytest.approx((21.0, 30.0))
    assert lat["rounds"] == 3 and lat["iterations"] == 9
    tput = vres["eager"]["throughput"]
    assert tput["samples_per_s"] == pytest.approx(40.0)  # rounds: 8 / 0.1 s, 8 / 0.2 s, 8 / 0.2 s
    assert (tput["min"], tput["max"]) == pytest.approx((40.0, 80.0))
    assert vres["eager"]["peak_rss_mib"] == pytest.approx(510.0)
    assert (vres["eager"]["peak_rss"]["min"], vres["eager"]["peak_rss"]["max"]) == (500.0, 520.0)
    assert [w["pid"] for w in vres["eager"]["workers"]] == [11, 12, 13]
    assert [w["position"] for w in vres["eager"]["workers"]] == [0, 1, 0]
    assert vres["eager"]["workers"][2]["sets"]["latency"]["p50_ms"] == pytest.approx(26.0)
    assert vres["compile"]["build"]["cold_s"] == pytest.approx(90.0)  # first round: empty inductor cache
    assert vres["compile"]["build"]["warm_s"] == pytest.approx(3.0)
    assert vres["ov_fp32"]["status"] == "skipped"
    assert vres["ov_fp32"]["reason"] == "the openvino package is not installed"


def test_openvino_default_is_offered_on_cpu_recipes_and_skipped_with_a_reason_without_openvino(monkeypatch):
    C = _benchmarks("compare")
    vres = {name: C._empty_variant(name) for name in S.VARIANTS}
    assert "ov_fp32" in S.VARIANTS
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    reasons = C.pre_skips(vres, "cpu")
    assert list(reasons) == ["ov_fp32"] and "openvino package is not installed" in reasons["ov_fp32"]
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("openvino") is not None:
        assert C.pre_skips(vres, "cpu") == {}
    assert "CPU only" in C.pre_skips(vres, "cuda")["ov_fp32"]


def test_worker_serve_times_each_feed_set_after_a_first_call_and_warm_up_and_saves_outputs(tmp_path, monkeypatch):
    import numpy as np

    W = _benchmarks("workers")
    (tmp_path / "fake_factory.py").write_text(
        "import numpy as np\n"
        "CALLS = []\n"
        "def make(variant, spec):\n"
        "    def call(feeds):\n"
        "        CALLS.append(len(feeds['x']))\n"
        "        return feeds['x'].sum(axis=1, keepdims=True) * 2\n"
        "    return call\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x1 = W.save_feeds(tmp_path / "b1.npz", {"x": np.ones((1, 3), np.float32)})
    x4 = W.save_feeds(tmp_path / "b4.npz", {"x": np.ones((4, 3), np.float32)})
    val = np.arange(30, dtype=np.float32).reshape(10, 3)
    xv = W.save_feeds(tmp_path / "val.npz", {"x": val})
    spec = {
        "factory": "fake_factory:make",
        "threads": 2,
        "round": 0,
        "feed_sets": [
            {"key": "latency", "path": str(x1), "warmup": 3, "iterations": 7},
            {"key": "throughput", "path": str(x4), "warmup": 1, "iterations": 2},
        ],
        "evaluate": [{"inputs": str(xv), "out": str(tmp_path / "out.npy"), "batch": 4}],
    }
    res = W.worker_serve("v", spec)
    calls = importlib.import_module("fake_factory").CALLS
    assert calls == [1] * (1 + 3 + 7) + [4] * (1 + 1 + 2) + [4, 4, 2]
    assert len(res["sets"]["latency"]["times_s"]) == 7 and len(res["sets"]["throughput"]["times_s"]) == 2
    assert res["pid"] == os.getpid() and res["round"] == 0
    assert res["peak_rss_mib"] > 0
    assert np.array_equal(np.load(tmp_path / "out.npy"), val.sum(axis=1, keepdims=True) * 2)


def test_transformer_variants_use_the_same_workers_one_process_per_variant_per_round(tmp_path):
    T = _benchmarks("transformer_variants")
    seen = []

    def fake_run(args, env):
        spec = json.loads(Path(args[args.index("--spec") + 1]).read_text())
        name = args[args.index("--variant") + 1]
        seen.append((spec["round"], name, spec["factory"], [fs["key"] for fs in spec["feed_sets"]]))
        if name == "accelc":
            raise RuntimeError("skipped: " + spec["reasons"]["accelc"])
        base = {"eager": 10.0, "ort_fp32": 2.0}[name] * (1 + spec["round"])
        sets = {fs["key"]: {"first_call_s": 0.1, "times_s": [base / 1e3] * 3, "peak_rss_mib": 1.0}
                for fs in spec["feed_sets"]}
        return {"pid": 100 + len(seen), "sets": sets, "peak_rss_mib": 50.0 + len(seen), "outputs": []}, 0.1

    prepared = {
        "files": {"ort_fp32": "m.onnx"},
        "reasons": {"accelc": "no --artifact given"},
        "feed_paths": {T.shape_key(b, s): f"{b}-{s}.npz" for b, s in T.SHAPES},
    }
    rows = T.bench(["eager", "ort_fp32", "accelc"], prepared, tmp_path, threads=2, rounds=3, warmup=1, iterations=3,
                   run=fake_run)
    assert [(r, n) for r, n, _, _ in seen] == [(0, "eager"), (0, "ort_fp32"), (0, "accelc"), (1, "ort_fp32"),
                                               (1, "eager"), (2, "eager"), (2, "ort_fp32")]
    assert {f for _, _, f, _ in seen} == {T.FACTORY}
    assert all(keys == [T.shape_key(b, s) for b, s in T.SHAPES] for _, _, _, keys in seen)
    eager = [r for r in rows if r["variant"] == "eager"]
    assert [(r["batch"], r["sequence"]) for r in eager] == list(T.SHAPES)
    assert eager[0]["p50_ms"] == pytest.approx(20.0)  # per-round medians 10, 20, 30
    assert (eager[0]["p50_min_ms"], eager[0]["p50_max_ms"]) == pytest.approx((10.0, 30.0))
    assert eager[0]["pids"] == [101, 105, 106] and eager[0]["rounds"] == 3
    assert {"variant": "accelc", "skipped": "no --artifact given"} in rows


def test_compare_times_every_variant_in_its_own_process_on_a_tiny_model(tmp_path):
    """One real run: workers are subprocesses, one per variant per round, rotated; peak memory and
    agreement come from them (the ONNX Runtime workers never import torch)."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from builders import write_tiny_recipe

    C = _benchmarks("compare")
    names = ["eager", "ort_fp32"] + (["ov_fp32"] if importlib.util.find_spec("openvino") else [])
    recipe = write_tiny_recipe(tmp_path / "recipe")
    settings = C.Settings(rounds=2, iterations=4, throughput_iterations=2, warmup=1, throughput_warmup=1, quick=True)
    r = C.bench_recipe(recipe, settings, 1, names, tmp_path / "work", None, False, lambda _: None)
    assert r["status"] == "ok"
    assert r["round_orders"] == [S.round_order(names, 0), S.round_order(names, 1)]
    v = r["variants"]
    pids = [w["pid"] for n in names for w in v[n]["workers"]]
    assert len(pids) == 2 * len(names) and len(set(pids)) == len(pids) and os.getpid() not in pids
    for n in names:
        assert v[n]["status"] == "ok", v[n]["reason"]
        assert [w["round"] for w in v[n]["workers"]] == [0, 1]
        assert [w["position"] for w in v[n]["workers"]] == [r["round_orders"][k].index(n) for k in (0, 1)]
        assert v[n]["latency"]["rounds"] == 2 and v[n]["latency"]["iterations"] == 8
        assert v[n]["latency"]["p50_ms"] == pytest.approx(float(np.median(v[n]["latency"]["p50_per_round_ms"])))
        assert v[n]["throughput"]["batch"] == 4
        assert v[n]["quality"]["samples"] == 24
    assert v["eager"]["workers"][0]["threads_in_use"] == {"torch": 1}
    assert v["ort_fp32"]["workers"][0]["threads_in_use"] == {}  # torch never imported in the ORT process
    assert v["ort_fp32"]["peak_rss_mib"] < v["eager"]["peak_rss_mib"]
    assert v["ort_fp32"]["quality"]["top1_agreement"] == 1.0 and v["ort_fp32"]["quality"]["cosine"] > 0.9999
    assert np.load(tmp_path / "work" / "outputs" / "ort_fp32-validation.npy").shape == (24, 10)


def test_onnx_runtime_workers_do_not_load_the_recipe_so_torch_stays_out_of_their_memory(tmp_path):
    """Loading a torchvision recipe imports torch; an ONNX Runtime worker must hold only what an ORT
    deployment holds, so it builds its session from the spec's files alone."""
    import numpy as np
    from onnx import TensorProto, helper, save

    V = _benchmarks("variants")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])],
        "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    save(model, str(tmp_path / "relu.onnx"))
    spec = {"recipe": str(tmp_path / "no-such-recipe.yaml"), "threads": 1, "device": "cpu",
            "ort_fp32": str(tmp_path / "relu.onnx")}
    call = V.serve_call("ort_fp32", spec)
    out = call({"input": np.array([[-1.0, 0.5, 2.0]], np.float32)})
    assert out.tolist() == [[0.0, 0.5, 2.0]]
    with pytest.raises(Exception, match="no-such-recipe"):
        V.serve_call("eager", spec)


def test_transformer_variants_extra_models_need_a_new_variant_name(capsys):
    from benchmarks import transformer_variants as TV

    for bad in ("eager=model.onnx", "not-an-identifier=model.onnx"):
        with pytest.raises(SystemExit) as e:
            TV.main(["--extra", bad])
        assert e.value.code == 2 and "--extra: NAME must be a new identifier" in capsys.readouterr().err
