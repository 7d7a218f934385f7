"""``benchmark``: latency percentiles and throughput of the final artifact, after warm-up."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import PassError, VerificationError
from accelc.pass_api import Pass, PassContext, PassResult, RecipeView, Slot
from accelc.runners import default_threads
from accelc.timing import TimedModel, time_models


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

    The artifact, and then each baseline, is timed alone in a worker process of its own, the way
    a deployment runs it (:func:`accelc.timing.time_models`: nothing else's threads spinning).
    Each batch size gets ``warmup`` untimed runs, then ``iterations`` timed runs
    (``time.perf_counter`` around each call, host outputs included). Batch sizes outside
    the signature's dynamic batch range are skipped and listed. The thread count is
    recorded (``threads``; default: the CPUs this process may use).
    """

    name = "benchmark"
    version = "3"
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
            "min_speedup": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "Set by lowering from verify.min_speedup: the artifact's batch-1 p50 must be at "
                "least this many times faster than the float baseline's, or the build fails.",
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

    #: a speed tolerance is checked on the result (:meth:`check`); changing it reruns nothing
    key_ignores = ("min_speedup",)

    def configure(self, options: dict[str, Any], recipe: RecipeView, where: str) -> dict[str, Any]:
        """An explicit ``benchmark`` step starts from the recipe's ``benchmark`` settings;
        ``verify.min_speedup`` becomes ``min_speedup`` (and the float baseline is then timed)."""
        opts = {**recipe.benchmark, **options}
        if recipe.verify.get("min_speedup") is not None:
            opts.setdefault("min_speedup", recipe.verify["min_speedup"])
            if opts.get("baselines") is not None and "float" not in opts["baselines"]:
                opts["baselines"] = [*opts["baselines"], "float"]
        return opts

    def check(self, result_metrics: dict[str, Any], options: dict[str, Any]) -> None:
        """``min_speedup``: the artifact's batch-1 p50 against the float baseline's (the FP32 ONNX
        graph before quantization), both timed each in its own process.

        Raises:
            VerificationError: the artifact is less than ``min_speedup`` times faster, or the float
                baseline or the batch-1 latency was not measured.
        """
        need = options.get("min_speedup")
        if need is None:
            return
        b1 = (result_metrics.get("batch") or {}).get("1") or {}
        base = (result_metrics.get("baselines") or {}).get("float") or {}
        if not b1.get("p50_ms") or not base.get("p50_ms"):
            why = base.get("error") or "no float ONNX model before the artifact, or batch 1 was not benchmarked"
            raise VerificationError(f"verify.min_speedup {need:g} cannot be checked: {why}")
        got = base["p50_ms"] / b1["p50_ms"]
        if got < need:
            raise VerificationError(
                f"the artifact is {got:.2f}x as fast as the FP32 ONNX model at batch 1 (p50 {b1['p50_ms']:.3g} ms "
                f"against {base['p50_ms']:.3g} ms, each in its own process); verify.min_speedup requires {need:g}x"
            )

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
        spec0 = ctx.signature.inputs[0]
        bdim = spec0.batch_dim()
        lo, hi = (bdim.min, bdim.max) if bdim else (spec0.shape[0], spec0.shape[0])
        rng = np.random.default_rng(0)
        feeds: dict[str, dict[str, np.ndarray]] = {}
        shapes: dict[str, tuple[int, int | None]] = {}
        skipped = []
        for bs in options["batch_sizes"]:
            if not lo <= bs <= hi:
                skipped.append(bs)
                continue
            for seq in [None, *options.get("sequence_lengths", [])]:
                key = f"batch {bs}" + (f", sequence {seq}" if seq else "")
                feeds[key] = _feeds(ctx.signature, bs, seq, rng)
                shapes[key] = (bs, seq)
        timed = time_models(
            [TimedModel("artifact", artifact=inputs["artifact"])], feeds, threads=threads,
            warmup=options["warmup"], iterations=options["iterations"], device=options["device"],
            runners=ctx.runners, scratch=ctx.scratch, progress=ctx.progress,
        )["artifact"]
        if timed.error is not None:
            raise PassError(f"benchmark: the artifact could not be timed: {timed.error}")
        per_batch: dict[str, Any] = {}
        per_shape: dict[str, Any] = {}
        for key, times in timed.times.items():
            bs, seq = shapes[key]
            if seq is None:
                latencies = [round(t * 1e3, 4) for t in times]
                per_batch[str(bs)] = {**latency_stats(times, bs), "latencies_ms": latencies}
            else:
                per_shape[f"{bs}x{seq}"] = {"batch": bs, "sequence": seq, **latency_stats(times, bs)}
        baselines = self._baselines(ctx, inputs, options, threads, lo, rng)
        metrics = {
            "threads": threads,
            "device": options["device"],
            "warmup": options["warmup"],
            "iterations": options["iterations"],
            "isolation": timed.isolation,
            **({"isolation_note": timed.note} if timed.note else {}),
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
        timed alone in its own process like the artifact; a baseline that cannot run is recorded
        with its ``error``."""
        if batch != 1 and ctx.signature.inputs[0].batch_dim() is None:
            return {}
        wanted = options.get("baselines")
        if wanted is None:
            wanted = ["source", "float"] if options["device"] == "cpu" else []
        models = [
            TimedModel(name, artifact=inputs[name])
            for name in ("source", "float")
            if name in wanted and name in inputs and inputs[name].digest != inputs["artifact"].digest
        ]
        if not models:
            return {}
        timed = time_models(
            models, {"1": _feeds(ctx.signature, batch, None, rng)}, threads=threads, warmup=options["warmup"],
            iterations=options["iterations"], device=options["device"], runners=ctx.runners,
            scratch=ctx.scratch, progress=lambda msg, *a: ctx.progress(f"baseline {msg}", *a),
        )
        out: dict[str, Any] = {}
        for m in models:
            t, kind = timed[m.name], inputs[m.name].kind
            if t.error is not None:  # a baseline is informative only; the build goes on
                out[m.name] = {"kind": kind, "error": t.error}
                continue
            out[m.name] = {"kind": kind, "batch": batch, "isolation": t.isolation, **latency_stats(t.times["1"], batch)}
        return out


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
