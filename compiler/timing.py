"""Latency measured the way a deployment runs: each model alone in a process of its own.

Every latency a build reports (``benchmark``'s artifact and baselines, the p50 of each
``calibrate`` / ``quantize`` trial) comes from :func:`time_models`. A deployed model runs
alone; timed inside the build process it would not: ONNX Runtime's intra-op threads spin
after every run (``session.intra_op.allow_spinning`` is on by default) and torch's OpenMP
workers wait actively too, so whatever else is loaded steals cores from the model being
timed (onnxruntime issue #13808 reports PyTorch ops 50x slower right after
``InferenceSession.run``). Measured on this project's 2-core build machine, one process
alternating them: ORT 3.47 ms and eager 22.6 ms with spinning on, 4.46 ms and 17.1 ms with
it off; each alone in its own process: ORT 5.2-5.8 ms, eager 25-29 ms (issue 12).

So each model is loaded and timed by a **worker process** (``python -m accelc.timing``)
that imports only the runtime that model needs, one model per process, processes run one
after the other. Process start, imports and model load are not timed; ``warmup`` untimed
calls come first. A model whose kind or runtime the worker's plugins do not know (a plugin
registered in the build process only) is timed in the build process instead, alone (every
other session of the pass released first), and its result says ``isolation: in-process``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import Artifact

#: How a measurement was isolated, as results record it.
ISOLATION_PROCESS = "process"
ISOLATION_IN_PROCESS = "in-process"

#: Prefix of the worker's progress lines on its stdout.
_PROGRESS = "ACCELC-TIMING-PROGRESS"

#: Seconds one worker may take beyond its timed calls' own budget (start, imports, load).
WORKER_TIMEOUT_S = 900


@dataclass(frozen=True)
class TimedModel:
    """One model to time: a runnable ``artifact`` (run by its kind's runner) or an ONNX file
    ``onnx`` run by ``runtime``'s trial session factory. ``name`` keys the results."""

    name: str
    artifact: Artifact | None = None
    onnx: Path | None = None
    runtime: str = "onnxruntime"

    def spec(self) -> dict[str, Any]:
        """JSON form for the worker."""
        if self.artifact is not None:
            a = self.artifact
            return {
                "name": self.name,
                "artifact": {"kind": a.kind, "path": str(a.path), "main": a.main, "digest": a.digest, "meta": a.meta},
            }
        return {"name": self.name, "onnx": str(self.onnx), "runtime": self.runtime}


@dataclass
class Timing:
    """Per-call wall times of one model, in seconds, ``{feed key: [s, ...]}`` (``time.perf_counter``
    around each call, host outputs included), how it was isolated, and the error that kept it
    from being timed (``times`` then empty)."""

    name: str
    times: dict[str, list[float]] = field(default_factory=dict)
    isolation: str = ISOLATION_PROCESS
    pid: int | None = None
    error: str | None = None
    note: str | None = None

    def p50_ms(self, key: str) -> float | None:
        """Median call time for ``key`` in ms (``None`` when not timed)."""
        t = self.times.get(key)
        return round(float(np.median(t)) * 1e3, 4) if t else None


def _open(model: dict[str, Any], device: str, threads: int | None, runners: Any) -> Any:
    """A runner (or trial session) for a worker spec, from ``runners`` (a :class:`RunnerFactory`)."""
    if "artifact" in model:
        a = model["artifact"]
        art = Artifact(a["kind"], Path(a["path"]), a["main"], a.get("digest", ""), a.get("meta") or {})
        return runners.make(art, device=device, threads=threads)
    return runners.session(model["onnx"], threads=threads, runtime=model["runtime"])


def _time_one(
    opened: Any, feeds: dict[str, dict[str, np.ndarray]], warmup: int, iterations: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for key, f in feeds.items():
        for _ in range(warmup):
            opened.run(f)
        times = []
        for i in range(iterations):
            t0 = time.perf_counter()
            opened.run(f)
            times.append(time.perf_counter() - t0)
            if progress is not None:
                progress(key, i + 1, iterations)
        out[key] = times
    return out


def _save_feeds(feeds: dict[str, dict[str, np.ndarray]], folder: Path) -> dict[str, str]:
    files = {}
    for i, (key, f) in enumerate(feeds.items()):
        p = folder / f"feeds{i}.npz"
        np.savez(p, **f)
        files[key] = str(p)
    return files


def time_models(
    models: list[TimedModel],
    feeds: dict[str, dict[str, np.ndarray]],
    *,
    threads: int | None,
    warmup: int,
    iterations: int,
    device: str = "cpu",
    runners: Any = None,
    scratch: Path | None = None,
    share_process: bool = False,
    progress: Callable[..., None] = lambda *_a, **_k: None,
) -> dict[str, Timing]:
    """Time each model alone, in a worker process, one model after the other.

    Args:
        models: what to time (names unique).
        feeds: ``{key: {input name: array}}``, e.g. ``{"1": batch-1 inputs, "8": batch-8 inputs}``;
            every model runs every key (``warmup`` untimed calls, then ``iterations`` timed ones).
        threads: intra-op threads of every runner/session (``None``: the runtime's default).
        device: ``cpu`` or ``cuda`` (runners of device-bound kinds).
        runners: the build's :class:`accelc.runners.RunnerFactory`, used only for a model the
            worker cannot open (then timed in this process; ``isolation: in-process``).
        scratch: where the feed files and the worker's result go (``None``: the system temp dir).
        share_process: time all ``models`` in one worker, each opened only after the previous one
            is released (for ONNX trial sessions: an ONNX Runtime session's intra-op thread pool
            belongs to the session and is joined when it is released, and that worker imports no
            torch, so the next model runs alone as in a process of its own, without paying a process
            start per trial). Default: one worker process per model.
        progress: ``progress(message)`` before each worker, ``progress(message, done, total)`` as its
            timed calls go (``message``: the feed key, e.g. ``batch 8``; ``<name>: batch <key>`` otherwise).

    Returns ``{name: Timing}``. A model neither the worker nor ``runners`` can run has ``error``
    set; nothing is raised for it (a latency is a measurement, the build goes on).
    """
    results: dict[str, Timing] = {}
    groups = [models] if share_process else [[m] for m in models]
    with tempfile.TemporaryDirectory(prefix="accelc-timing-", dir=scratch) as tmp_dir:
        tmp = Path(tmp_dir)
        feed_files = _save_feeds(feeds, tmp)
        for group in groups:
            if not group:
                continue
            names = ", ".join(m.name for m in group)
            progress(f"timing {names} in {'a process' if share_process else 'its own process'}")
            for t in _worker(group, feed_files, tmp, threads, warmup, iterations, device, progress):
                m = next(x for x in group if x.name == t.name)
                if t.error is not None and runners is not None and t.error.startswith("unknown:"):
                    t = _in_process(m, feeds, threads, warmup, iterations, device, runners, t.error)
                results[m.name] = t
    return results


def _worker(
    group: list[TimedModel], feed_files: dict[str, str], tmp: Path, threads: int | None, warmup: int,
    iterations: int, device: str, progress: Callable[..., None] = lambda *_a, **_k: None,
) -> list[Timing]:
    result = tmp / "result.json"
    spec = {
        "models": [m.spec() for m in group], "feeds": feed_files, "threads": threads, "warmup": warmup,
        "iterations": iterations, "device": device, "result": str(result),
    }
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    result.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelc.timing", str(spec_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    timer = threading.Timer(WORKER_TIMEOUT_S, proc.kill)
    timer.start()
    other: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the worker's progress lines: PROGRESS <model index> <done> <total> <key>
            parts = line.rstrip("\n").split(" ", 4)
            if len(parts) == 5 and parts[0] == _PROGRESS:
                name, key = group[int(parts[1])].name, parts[4]
                progress(key if key.startswith("batch") else f"{name}: batch {key}", int(parts[2]), int(parts[3]))
            else:
                other.append(line)
        stderr = proc.stderr.read() if proc.stderr else ""
        proc.wait()
    finally:
        timer.cancel()
    if not result.exists():
        if proc.returncode == -9:
            return [Timing(m.name, error=f"timing worker exceeded {WORKER_TIMEOUT_S} s") for m in group]
        tail = (stderr or "".join(other)).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return [Timing(m.name, error=f"timing worker failed: {tail[0][:300]}") for m in group]
    doc = json.loads(result.read_text())
    return [
        Timing(m.name, r.get("times", {}), ISOLATION_PROCESS, doc.get("pid"), r.get("error"))
        for m, r in zip(group, doc["results"], strict=True)
    ]


def _in_process(
    m: TimedModel, feeds: dict[str, dict[str, np.ndarray]], threads: int | None, warmup: int, iterations: int,
    device: str, runners: Any, why: str,
) -> Timing:
    gc.collect()  # release sessions the pass dropped, so only this model's threads run
    try:
        opened = _open(m.spec(), device, threads, runners)
        times = _time_one(opened, feeds, warmup, iterations)
        del opened
    except Exception as e:  # noqa: BLE001 - a latency is informative; the build goes on
        return Timing(m.name, isolation=ISOLATION_IN_PROCESS, error=f"{type(e).__name__}: {e}")
    return Timing(
        m.name, times, ISOLATION_IN_PROCESS, os.getpid(),
        note=f"timed in the build process: the worker could not open it ({why.removeprefix('unknown: ')})",
    )


def worker_main(spec_file: str) -> int:
    """``python -m accelc.timing SPEC``: open each of the spec's models in turn with the installed
    plugins (the previous one released first), time it, and write ``{"pid", "results": [{"times"} |
    {"error"}, ...]}`` (an error starting ``unknown:`` when no plugin here runs that model)."""
    spec = json.loads(Path(spec_file).read_text())
    results: list[dict[str, Any]] = []
    try:
        from .registry import default_registry
        from .runners import RunnerFactory

        reg = default_registry()
        runners = RunnerFactory(reg.runners, reg.runtimes)
        feeds = {k: dict(np.load(p)) for k, p in spec["feeds"].items()}
    except Exception as e:  # noqa: BLE001 - reported to the build, which records it
        results = [{"error": f"{type(e).__name__}: {e}"} for _ in spec["models"]]
    else:
        for model in spec["models"]:
            kind = model.get("artifact", {}).get("kind")
            if kind is not None and kind not in reg.runners:
                results.append({"error": f"unknown: no runner for kind '{kind}' in the worker's plugins"})
                continue
            if kind is None and model["runtime"] not in reg.runtimes:
                results.append({"error": f"unknown: no runtime '{model['runtime']}' in the worker's plugins"})
                continue
            try:
                opened = _open(model, spec["device"], spec["threads"], runners)
                index = len(results)

                def report(key: str, done: int, total: int, index: int = index) -> None:
                    if done == total or done % max(1, total // 20) == 0:
                        print(f"{_PROGRESS} {index} {done} {total} {key}", flush=True)

                results.append({"times": _time_one(opened, feeds, spec["warmup"], spec["iterations"], report)})
            except Exception as e:  # noqa: BLE001 - reported to the build, which records it
                results.append({"error": f"{type(e).__name__}: {e}"})
            opened = None
            gc.collect()
    Path(spec["result"]).write_text(json.dumps({"pid": os.getpid(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
