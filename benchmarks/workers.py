"""``benchmarks.compare``'s subprocess workers: serve one variant, export, quantize; each prints its result
as the last stdout line (``RESULT_PREFIX`` + JSON)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.variants import Skip, load_model, make_call

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH-RESULT "
#: Wall-clock limit of one subprocess (a cold torch.compile on 2 cores takes minutes).
SUBPROCESS_TIMEOUT_S = 3600


# --- subprocess workers ------------------------------------------------------------------------------


def _emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _peak_rss_mib() -> tuple[float, float]:
    """(this process, largest waited-for child) peak resident set size in MiB.

    This process's peak is ``VmHWM`` from ``/proc/self/status``: the high-water mark of the
    address space created at exec. ``ru_maxrss`` (the fallback off Linux) can carry the parent's
    peak across fork + exec, which made every worker report the benchmark process's size.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) / 1024
    except OSError:
        pass
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def random_feeds(recipe: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs at ``batch`` for every input of the recipe's signature."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in recipe.signature.inputs:
        bdim = spec.batch_dim()
        shape = spec.shape_with(**({bdim.name: batch} if bdim else {}))
        feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def worker_serve(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Load ``variant``, run it at batch 1 and then at the larger batch; report its peak RSS (MiB),
    overall and after each batch size's runs, and the first call's time at each batch (s; for
    torch.compile that is where compilation happens)."""
    from accelc.recipe import load_recipe
    from accelc.registry import default_registry

    recipe = load_recipe(spec["recipe"], default_registry())
    t0 = time.perf_counter()
    call = make_call(variant, spec, recipe)
    load_s = time.perf_counter() - t0
    first, peaks = {}, {}
    for bs in (1, spec["batch"]):
        feeds = random_feeds(recipe, bs)
        t = time.perf_counter()
        call(feeds)
        first[str(bs)] = time.perf_counter() - t
        for _ in range(spec["rss_iterations"]):
            call(feeds)
        peaks[str(bs)] = _peak_rss_mib()[0]
    own, kids = _peak_rss_mib()
    return {
        "peak_rss_mib": own,
        "peak_rss_mib_after_batch": peaks,
        "children_peak_rss_mib": kids,
        "load_s": load_s,
        "first_call_s": first,
    }


def default_export(model: Any, recipe: Any, path: Path) -> None:
    """``torch.onnx.export(model, x, path)`` with torch's defaults, plus input/output names and a
    dynamic axis for every dynamic dimension of the recipe (so the larger batch runs)."""
    import torch

    args = tuple(torch.from_numpy(a) for a in random_feeds(recipe, recipe.signature.inputs[0].shape[0]).values())
    dynamic_axes = {s.name: {d.axis: d.name for d in s.dynamic} for s in recipe.signature.inputs if s.dynamic}
    torch.onnx.export(
        model,
        args,
        str(path),
        input_names=recipe.signature.names,
        output_names=["output"],
        dynamic_axes=dynamic_axes or None,
    )


class CalibrationReader:
    """The ``CalibrationDataReader`` a user writes: one sample per ``get_next``, then ``None``."""

    def __init__(self, arrays: dict[str, np.ndarray], names: list[str]):
        n = len(arrays[names[0]])
        self._it = iter([{k: arrays[k][i : i + 1] for k in names} for i in range(n)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def worker_export(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the recipe's model and export it with :func:`default_export` to ``spec["out"]``."""
    from accelc.recipe import load_recipe
    from accelc.registry import default_registry

    recipe = load_recipe(spec["recipe"], default_registry())
    model = load_model(recipe)
    default_export(model, recipe, Path(spec["out"]))
    return {"path": spec["out"]}


def worker_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    """``quantize_static(fp32, int8, reader)`` with ORT's defaults, calibrated on the recipe's
    calibration data (one sample per batch, the recipe's preprocessing)."""
    from onnxruntime.quantization import quantize_static

    from accelc.recipe import load_recipe
    from accelc.registry import default_registry

    reg = default_registry()
    recipe = load_recipe(spec["recipe"], reg)
    cal_spec = recipe.data["calibration"]
    cal = reg.data_sources[cal_spec["source"]].load(cal_spec, recipe.signature)
    quantize_static(spec["fp32"], spec["out"], CalibrationReader(cal, recipe.signature.names))
    return {"path": spec["out"], "calibration_samples": int(len(cal[recipe.signature.names[0]]))}


def run_worker(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """Run this script as a worker subprocess; return its result and its wall time in s.
    Raises RuntimeError with the worker's last output lines when it fails."""
    cmd = [sys.executable, "-m", "benchmarks.compare", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            if "error" in result:
                raise RuntimeError(result["error"])
            return result, wall
    tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-8:])
    raise RuntimeError(f"worker {' '.join(args[:3])} exited {p.returncode} without a result:\n{tail}")


def worker_main(kind: str, variant: str | None, spec_file: str) -> int:
    """Entry point of ``--worker``: run one job and print its result as the last stdout line."""
    spec = json.loads(Path(spec_file).read_text())
    os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    try:
        if kind == "serve":
            result = worker_serve(variant or "", spec)
        elif kind == "export":
            result = worker_export(spec)
        elif kind == "quantize":
            result = worker_quantize(spec)
        else:
            raise ValueError(f"unknown worker {kind!r}")
    except Skip as e:
        _emit({"error": f"skipped: {e}"})
        return 0
    except Exception as e:  # reported to the parent, which marks the variant failed
        _emit({"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"})
        return 1
    _emit(result)
    return 0


# --- the accelc build ---------------------------------------------------------------------------------
