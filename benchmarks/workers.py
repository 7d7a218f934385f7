"""The benchmarks' worker processes and the rounds that alternate them.

Every timed variant runs alone in a worker process of its own, as a deployed model does: no other
runtime's thread pool is alive in it. ONNX Runtime's intra-op threads spin after every run
(``session.intra_op.allow_spinning`` is on by default) and torch's OpenMP workers wait actively
too, so in one shared process each runtime's idle threads take the cores from the next one.

:func:`time_in_processes` alternates the workers over rounds the way hyperfine alternates
commands: round ``r`` starts one worker per variant, in :func:`benchmarks.summary.round_order`
(rotated by ``r``). A ``serve`` worker (:func:`worker_serve`) loads its variant, then for each feed
set makes one untimed first call, warm-up calls and timed calls, reports every call's time and its
peak resident memory, and may save its outputs on given inputs for the agreement check.

Run as ``python -m benchmarks.workers KIND --spec FILE [--variant NAME]`` (from the repository
root); each worker prints its result as the last stdout line (:data:`RESULT_PREFIX` + JSON).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.summary import round_order

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH-RESULT "
#: Wall-clock limit of one subprocess (a cold torch.compile on 2 cores takes minutes).
SUBPROCESS_TIMEOUT_S = 3600
#: The factory a ``serve`` worker builds its callable with unless the spec names another
#: (``"module:function"``, called as ``function(variant, spec)``).
DEFAULT_FACTORY = "benchmarks.variants:serve_call"


# --- inside a worker -----------------------------------------------------------------------------------


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


def load_feeds(path: str | Path) -> dict[str, np.ndarray]:
    """``{input name: array}`` from an ``.npz`` written by :func:`save_feeds`."""
    with np.load(path) as z:
        return {k: np.ascontiguousarray(z[k]) for k in z.files}


def save_feeds(path: Path, feeds: dict[str, np.ndarray]) -> Path:
    """Write ``{input name: array}`` as an uncompressed ``.npz``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **feeds)
    return path


def time_calls(call: Callable[[dict[str, np.ndarray]], Any], feeds: dict[str, np.ndarray], warmup: int,
               iterations: int) -> tuple[float, list[float]]:
    """One untimed first call (its time returned apart: where torch.compile compiles), ``warmup``
    untimed calls, then ``iterations`` calls each timed with ``perf_counter``. Times in s."""
    t0 = time.perf_counter()
    call(feeds)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        call(feeds)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        call(feeds)
        times.append(time.perf_counter() - t0)
    return first, times


def _factory(spec: dict[str, Any]) -> Callable[[str, dict[str, Any]], Callable[..., np.ndarray]]:
    module, _, name = spec.get("factory", DEFAULT_FACTORY).partition(":")
    return getattr(importlib.import_module(module), name)


def _threads_in_use() -> dict[str, int]:
    """The thread counts the runtimes imported in this process report (torch's intra-op pool)."""
    out = {}
    if "torch" in sys.modules:
        out["torch"] = int(sys.modules["torch"].get_num_threads())
    return out


def worker_serve(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Load ``variant`` (``spec["factory"]``, default :data:`DEFAULT_FACTORY`), then for each of
    ``spec["feed_sets"]`` (``{"key", "path" (.npz), "warmup", "iterations"}``) time its calls
    with :func:`time_calls`; then save the outputs on each of ``spec["evaluate"]`` (``{"inputs"
    (.npz), "out" (.npy), "batch"}``: the first output of calls on ``batch`` rows at a time,
    concatenated, float32), which the timed calls and the peak memory do not include.

    Returns ``pid``, ``round``, ``load_s`` (making the callable: model load, session creation),
    ``threads`` (what the spec asked; ``threads_in_use`` what torch reports), per feed set
    ``first_call_s``, ``times_s`` (one per timed call) and ``peak_rss_mib`` after it, the overall
    ``peak_rss_mib`` (``VmHWM``) and ``children_peak_rss_mib``, and the ``outputs`` written.
    """
    t0 = time.perf_counter()
    call = _factory(spec)(variant, spec)
    load_s = time.perf_counter() - t0
    sets: dict[str, Any] = {}
    for fs in spec["feed_sets"]:
        feeds = load_feeds(fs["path"])
        first, times = time_calls(call, feeds, int(fs["warmup"]), int(fs["iterations"]))
        sets[fs["key"]] = {"first_call_s": first, "times_s": times, "peak_rss_mib": _peak_rss_mib()[0]}
    own, kids = _peak_rss_mib()
    outputs = []
    for ev in spec.get("evaluate") or []:
        arrays = load_feeds(ev["inputs"])
        n, step = len(next(iter(arrays.values()))), int(ev["batch"])
        outs = [
            np.asarray(call({k: np.ascontiguousarray(a[s : s + step]) for k, a in arrays.items()}), np.float32)
            for s in range(0, n, step)
        ]
        np.save(ev["out"], np.concatenate(outs))
        outputs.append(ev["out"])
    return {
        "variant": variant,
        "pid": os.getpid(),
        "round": spec.get("round"),
        "load_s": load_s,
        "threads": spec.get("threads"),
        "threads_in_use": _threads_in_use(),
        "sets": sets,
        "peak_rss_mib": own,
        "children_peak_rss_mib": kids,
        "outputs": outputs,
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
    from benchmarks.variants import load_model

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


def worker_profile(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Per-operator profile of ``variant`` at batch 1 (:func:`benchmarks.profiling.profile_variant`)
    on the first feed set, alone in this process; ``{"profile": ... | None, "macs": int | None}``."""
    from benchmarks.profiling import profile_variant

    feeds_1 = load_feeds(spec["feed_sets"][0]["path"])
    return profile_variant(variant, spec, feeds_1, Path(spec["work"]), int(spec["profile_runs"]))


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {
    "serve": worker_serve,
    "profile": worker_profile,
    "export": lambda _variant, spec: worker_export(spec),
    "quantize": lambda _variant, spec: worker_quantize(spec),
}


def worker_main(kind: str, variant: str | None, spec_file: str) -> int:
    """Run one job of :data:`WORKERS` and print its result as the last stdout line. A variant that
    cannot run here (``benchmarks.variants.Skip``) reports ``{"error": "skipped: ..."}``."""
    from benchmarks.variants import Skip

    spec = json.loads(Path(spec_file).read_text())
    os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    try:
        if kind not in WORKERS:
            raise ValueError(f"unknown worker {kind!r} (known: {', '.join(WORKERS)})")
        result = WORKERS[kind](variant or "", spec)
    except Skip as e:
        _emit({"error": f"skipped: {e}"})
        return 0
    except Exception as e:  # reported to the parent, which marks the variant failed
        _emit({"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"})
        return 1
    _emit(result)
    return 0


# --- in the parent --------------------------------------------------------------------------------------


def run_worker(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """Run ``python -m benchmarks.workers ARGS`` (``KIND --spec FILE [--variant NAME]``) as a
    subprocess; return its result and its wall time in s. Raises RuntimeError with the worker's
    error (``"skipped: ..."`` for a variant that cannot run here) or its last output lines."""
    cmd = [sys.executable, "-m", "benchmarks.workers", *args]
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


@dataclass
class Rounds:
    """What :func:`time_in_processes` measured: ``orders`` (the variants in each round, in the
    order their workers ran), ``results`` (per variant, one :func:`worker_serve` result per round
    it ran, each with ``position`` in its round and the worker's ``wall_s`` added) and
    ``failures`` (variant -> why it stopped: ``"skipped: ..."`` or the error, with the round)."""

    orders: list[list[str]] = field(default_factory=list)
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def time_in_processes(
    variants: Sequence[str],
    spec: dict[str, Any],
    rounds: int,
    work: Path,
    env: dict[str, str] | None = None,
    evaluate: dict[str, list[dict[str, Any]]] | None = None,
    say: Callable[[str], None] = lambda _: None,
    run: Callable[[list[str], dict[str, str] | None], tuple[dict[str, Any], float]] = run_worker,
) -> Rounds:
    """Time every variant in a ``serve`` worker of its own, ``rounds`` times, alternating the
    workers: round ``r`` runs one worker per variant still running, in ``round_order(variants, r)``,
    one at a time. ``spec`` is what every worker gets (feed sets, threads, files) plus ``round``;
    ``evaluate[variant]`` (see :func:`worker_serve`) is passed to that variant's first worker only.
    A variant whose worker fails or skips is recorded in ``failures`` and not run again; its
    earlier rounds are dropped from ``results``. ``run`` starts one worker (:func:`run_worker`)."""
    out = Rounds(results={v: [] for v in variants})
    alive = list(variants)
    work.mkdir(parents=True, exist_ok=True)
    for r in range(rounds):
        order = round_order(alive, r)
        out.orders.append(order)
        for position, name in enumerate(order):
            say(f"round {r + 1}/{rounds}: {name} in its own process")
            wspec = {**spec, "round": r, "evaluate": (evaluate or {}).get(name, []) if r == 0 else []}
            spec_file = work / f"worker-{name}.json"
            spec_file.write_text(json.dumps(wspec))
            try:
                res, wall = run(["serve", "--variant", name, "--spec", str(spec_file)], env)
            except RuntimeError as e:
                text = str(e)
                out.failures[name] = text if text.startswith("skipped:") or r == 0 else f"round {r + 1}: {text}"
                out.results.pop(name, None)
                alive.remove(name)
                continue
            out.results[name].append({**res, "position": position, "wall_s": wall})
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.workers KIND --spec FILE [--variant NAME]``: one worker job."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(WORKERS))
    ap.add_argument("--spec", required=True, help="the job's JSON spec file")
    ap.add_argument("--variant", help="the variant to load (serve, profile)")
    a = ap.parse_args(argv)
    return worker_main(a.kind, a.variant, a.spec)


if __name__ == "__main__":
    sys.exit(main())
