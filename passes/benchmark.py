"""``benchmark``: latency percentiles and throughput of the final artifact, after warm-up."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.pass_api import Pass, PassContext, PassResult, RecipeView, Slot
from accelc.runners import default_threads


def latency_stats(seconds: list[float], batch: int) -> dict[str, float]:
    """p50/p95/p99/mean latency in ms (numpy linear-interpolated percentiles) and throughput
    in samples/s (``batch / mean latency``) from per-iteration wall times in seconds."""
    a = np.asarray(seconds) * 1e3
    mean = float(a.mean())
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": mean,
        "throughput": batch * 1e3 / mean,
    }


class Benchmark(Pass):
    """Measure the artifact's latency per batch size on seeded random inputs.

    Each batch size gets ``warmup`` untimed runs, then ``iterations`` timed runs
    (``time.perf_counter`` around each call, host outputs included). Batch sizes outside
    the signature's dynamic batch range are skipped and listed. The thread count is
    recorded (``threads``; default: the CPUs this process may use).
    """

    name = "benchmark"
    version = "2"
    inputs = (
        Slot("artifact", runnable=True, runs=True),
        # baselines timed at batch 1 after the artifact: the source model (eager PyTorch, the first
        # torch.module: load_model's) and the float ONNX graph (the last onnx before the artifact)
        Slot("source", ("torch.module",), source=True, optional=True),
        Slot("float", ("onnx",), optional=True),
    )
    produces = "benchmark.report"
    final = False
    env_packages = ("onnxruntime", "torch", "numpy")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "batch_sizes": {"type": "array", "items": {"type": "integer", "minimum": 1}, "default": [1, 8]},
            "warmup": {"type": "integer", "minimum": 0, "default": 10},
            "iterations": {"type": "integer", "minimum": 1, "default": 50},
            "threads": {"type": "integer", "minimum": 1},
            "device": {"enum": ["cpu", "cuda"], "default": "cpu"},
            "sequence_lengths": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1},
                "description": "Also time these sizes of a dynamic axis named 'sequence' at every batch size.",
            },
            "baselines": {
                "type": "array",
                "items": {"enum": ["source", "float"]},
                "uniqueItems": True,
                "description": "Also time these at batch 1, after the artifact, for the report's speed-ups: "
                "'source' (the source model in eager PyTorch), 'float' (the FP32 ONNX graph before "
                "quantization). Unset: those the pipeline has, on a CPU device; none on CUDA.",
            },
        },
    }

    def configure(self, options: dict[str, Any], recipe: RecipeView, where: str) -> dict[str, Any]:
        """An explicit ``benchmark`` step starts from the recipe's ``benchmark`` settings."""
        return {**recipe.benchmark, **options}

    def uses_inputs(self, options: dict[str, Any]) -> set[str] | None:
        """``baselines`` set: exactly those slots (required). Unset: whatever the pipeline has (``None``),
        timed on a CPU device only (on a GPU the float graph would run on another runtime)."""
        if options.get("baselines") is None:
            return None
        return {"artifact", *options["baselines"]}

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        return {"cpu": host.cpu_model, "cpus": host.cpu_count}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        threads = options.get("threads") or default_threads()
        runner = ctx.runners.make(inputs["artifact"], device=options["device"], threads=threads)
        spec0 = ctx.signature.inputs[0]
        bdim = spec0.batch_dim()
        lo, hi = (bdim.min, bdim.max) if bdim else (spec0.shape[0], spec0.shape[0])
        rng = np.random.default_rng(0)
        per_batch: dict[str, Any] = {}
        per_shape: dict[str, Any] = {}
        skipped = []
        for bs in options["batch_sizes"]:
            if not lo <= bs <= hi:
                skipped.append(bs)
                continue
            for seq in [None, *options.get("sequence_lengths", [])]:
                feeds = _feeds(ctx.signature, bs, seq, rng)
                what = f"batch {bs}" + (f", sequence {seq}" if seq else "")
                ctx.progress(f"{what}: warm-up")
                for _ in range(options["warmup"]):
                    runner.run(feeds)
                ctx.progress(f"{what}: {options['iterations']} timed runs")
                times = _timed(runner, feeds, options["iterations"], ctx, what)
                if seq is None:
                    latencies = [round(t * 1e3, 4) for t in times]
                    per_batch[str(bs)] = {**latency_stats(times, bs), "latencies_ms": latencies}
                else:
                    per_shape[f"{bs}x{seq}"] = {"batch": bs, "sequence": seq, **latency_stats(times, bs)}
        del runner  # its threads must not compete with the baselines'
        baselines = self._baselines(ctx, inputs, options, threads, lo, rng)
        metrics = {
            "threads": threads,
            "device": options["device"],
            "warmup": options["warmup"],
            "iterations": options["iterations"],
            "batch": per_batch,
            "skipped_batch_sizes": skipped,
            **({"sequence": _sequence(ctx.signature), "batch_sequence": per_shape} if _sequence(ctx.signature) else {}),
            "artifact_kind": inputs["artifact"].kind,
            **({"baselines": baselines} if baselines else {}),
        }
        (ctx.workdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return PassResult("metrics.json", metrics=metrics)

    def _baselines(
        self,
        ctx: PassContext,
        inputs: dict[str, Artifact],
        options: dict[str, Any],
        threads: int,
        batch: int,
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        """``{"source" | "float": latency stats at the smallest batch}`` for the wired baselines, each
        after its own warm-up; a baseline that cannot run is recorded with its ``error``."""
        if batch != 1 and ctx.signature.inputs[0].batch_dim() is None:
            return {}
        feeds = _feeds(ctx.signature, batch, None, rng)
        out: dict[str, Any] = {}
        wanted = options.get("baselines")
        if wanted is None:
            wanted = ["source", "float"] if options["device"] == "cpu" else []
        for name in ("source", "float"):
            art = inputs.get(name) if name in wanted else None
            if art is None or art.digest == inputs["artifact"].digest:
                continue
            ctx.progress(f"baseline {name}: {options['iterations']} timed runs")
            try:
                runner = ctx.runners.make(art, device=options["device"], threads=threads)
                for _ in range(options["warmup"]):
                    runner.run(feeds)
                times = _timed(runner, feeds, options["iterations"], ctx, f"baseline {name}")
                del runner
            except Exception as e:  # a baseline is informative only; the build goes on
                out[name] = {"kind": art.kind, "error": f"{type(e).__name__}: {e}"}
                continue
            out[name] = {"kind": art.kind, "batch": batch, **latency_stats(times, batch)}
        return out


def _timed(runner: Any, feeds: dict[str, np.ndarray], iterations: int, ctx: PassContext, what: str) -> list[float]:
    """Per-iteration wall times in seconds (``time.perf_counter`` around each call)."""
    times = []
    for i in range(iterations):
        t0 = time.perf_counter()
        runner.run(feeds)
        times.append(time.perf_counter() - t0)
        ctx.progress(what, i + 1, iterations)
    return times

def _sequence(signature: Any) -> int | None:
    """The example size of the first input's axis named ``sequence`` (``None`` without one)."""
    d = next((d for d in signature.inputs[0].dynamic if d.name == "sequence"), None)
    return signature.inputs[0].shape[d.axis] if d else None


def _feeds(signature: Any, batch: int, sequence: int | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded inputs at ``batch`` (and ``sequence`` for an axis of that name): standard normal floats;
    integer inputs (token ids, masks, token types) all ones, valid for any vocabulary and mask."""
    feeds = {}
    for spec in signature.inputs:
        sizes = {d.name: batch for d in spec.dynamic if d.axis == 0}
        if sequence is not None:
            sizes["sequence"] = sequence
        shape = spec.shape_with(**sizes)
        if np.issubdtype(np.dtype(spec.dtype), np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
    return feeds
