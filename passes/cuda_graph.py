"""``cuda_graph``: capture and replay the final runtime in a CUDA graph, and write the runtime config.

A CUDA graph cannot be serialised, so this pass does at build time what the loader
(:func:`accelc.runtime.load`) does again at load time: load the model (a TensorRT engine
run through an execution context enqueued on a stream, or a torch artifact), warm up and
capture one graph per static input shape. It then checks, per shape, that replaying the
graph on fresh inputs gives the outputs of the same model run without a graph, and
measures the latency with and without the graph. The artifact (``runtime.config``) is
``runtime.json`` plus a copy of the model file (and of the engine's updated TensorRT timing
cache), so a build's out dir is all :func:`accelc.runtime.load` needs.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, RecipeView, Slot
from accelc.signature import InputSignature

from .cuda_graph_runtime import CONFIG_NAME, Predictor, RuntimeConfig, write_config

#: artifact kind -> runtime backend
BACKEND_OF = {
    "trt.engine": "tensorrt",
    "torch.module": "torch",
    "torchscript": "torch",
    "torch.exported": "torch",
}


def graph_shapes(signature: InputSignature, batch_sizes: list[int] | None) -> list[tuple[tuple[int, ...], ...]]:
    """Static input shapes, one per captured graph: the recipe's example shapes with the batch
    axis (a dynamic axis 0) set to each of ``batch_sizes`` (default: the example batch only).

    Raises ``PassError`` for a batch size outside an input's dynamic batch range, or different
    from the example batch of an input whose axis 0 is static.
    """
    sizes = list(dict.fromkeys(batch_sizes or [signature.inputs[0].shape[0]]))
    out = []
    for b in sizes:
        row = []
        for spec in signature.inputs:
            d = spec.batch_dim()
            if d is None:
                if spec.shape[0] != b:
                    raise PassError(
                        f"cuda_graph.batch_sizes: input '{spec.name}' has a static batch of "
                        f"{spec.shape[0]}, cannot capture batch {b}"
                    )
                row.append(tuple(spec.shape))
            elif not d.min <= b <= d.max:
                raise PassError(
                    f"cuda_graph.batch_sizes: {b} is outside input '{spec.name}''s dynamic batch range {d.min}..{d.max}"
                )
            else:
                row.append(spec.shape_with(**{d.name: b}))
        out.append(tuple(row))
    return out


def _p50_ms(fn: Any, sync: Any, iterations: int) -> float:
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(np.asarray(times) * 1e3, 50))


class CudaGraph(Pass):
    """Check CUDA Graph capture/replay per static input shape and write ``runtime.json`` for the loader.

    Per shape: replay on fresh seeded inputs must match the non-graph run within
    ``atol + rtol * max|out|`` (``bitwise_equal`` says whether they are identical), and
    the p50 latency of both (host wall time per call, inputs on the GPU, output copies
    included) is reported with their ratio. Raises ``PassError`` when a capture fails or
    a replay differs.
    """

    name = "cuda_graph"
    version = "2"
    inputs = (Slot("model", ("trt.engine", "torch.module", "torchscript", "torch.exported"), runs=True),)
    produces = "runtime.config"
    requires = ("cuda",)
    env_packages = ("torch",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "batch_sizes": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1},
                "minItems": 1,
                "uniqueItems": True,
                "description": "One graph per batch size (default: the recipe's example batch and "
                "its benchmark batch sizes, filled in by lowering).",
            },
            "warmup": {
                "type": "integer",
                "minimum": 0,
                "default": 3,
                "description": "Untimed runs before each capture (lazy kernel initialisation).",
            },
            "iterations": {
                "type": "integer",
                "minimum": 1,
                "default": 50,
                "description": "Timed calls per shape, with and without the graph.",
            },
            "atol": {"type": "number", "minimum": 0, "default": 1e-4},
            "rtol": {"type": "number", "minimum": 0, "default": 1e-3},
        },
    }

    def configure(self, options: dict[str, Any], recipe: RecipeView, where: str) -> dict[str, Any]:
        """``batch_sizes`` by default: the example batch and the benchmark's batch sizes that fit the
        dynamic batch range (a static batch: the example batch only)."""
        if "batch_sizes" in options:
            return options
        spec = recipe.signature.inputs[0]
        d = spec.batch_dim()
        if d is None:
            return {**options, "batch_sizes": [spec.shape[0]]}
        wanted = [spec.shape[0], *recipe.benchmark.get("batch_sizes", [])]
        return {**options, "batch_sizes": sorted({b for b in wanted if d.min <= b <= d.max})}

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        cuda = host.cuda or {}
        return {"gpu": cuda.get("name"), "sm": cuda.get("sm")}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import torch

        model = inputs["model"]
        backend = BACKEND_OF[model.kind]
        shapes = graph_shapes(ctx.signature, options.get("batch_sizes"))
        shutil.copyfile(model.file, ctx.workdir / model.main)
        tc = model.meta.get("timing_cache")
        if tc and (model.path / tc).is_file():
            shutil.copyfile(model.path / tc, ctx.workdir / tc)
        if backend == "tensorrt":
            from accelc.passes.tensorrt import TrtModule

            probe = TrtModule(model.file)
            names = list(probe.input_names)
            dtypes = [str(probe.dtypes[n]).removeprefix("torch.") for n in names]
            del probe
            by_name = {s.name: s for s in ctx.signature.inputs}
            if set(names) != set(by_name):
                raise PassError(f"cuda_graph: engine inputs {names} differ from the recipe's {sorted(by_name)}")
            order = [ctx.signature.names.index(n) for n in names]
            shapes = [tuple(shape[i] for i in order) for shape in shapes]
        else:
            names = list(ctx.signature.names)
            model_dtype = model.meta.get("input_dtype", "float32")
            dtypes = [
                model_dtype if torch.empty(0, dtype=getattr(torch, s.dtype)).is_floating_point() else s.dtype
                for s in ctx.signature.inputs
            ]
        cfg = RuntimeConfig(
            backend=backend,
            model=model.main,
            model_kind=model.kind,
            input_names=tuple(names),
            input_dtypes=tuple(dtypes),
            shapes=tuple(shapes),
            warmup=options["warmup"],
            pythonpath=tuple(model.meta.get("pythonpath", [])),
        )
        write_config(ctx.workdir, cfg)

        ctx.progress(f"capturing {len(shapes)} graph(s)")
        pred = Predictor(ctx.workdir, cfg)
        dev = pred.device
        sync = lambda: torch.cuda.synchronize(dev)  # noqa: E731
        per_batch: dict[str, Any] = {}
        for i, shape in enumerate(pred.shapes):
            g = torch.Generator(device=dev).manual_seed(1000 + i)  # not the capture inputs
            fresh = [
                torch.randn(s, generator=g, device=dev).to(dt)
                if dt.is_floating_point
                else torch.zeros(s, dtype=dt, device=dev)
                for s, dt in zip(shape, pred.input_dtypes, strict=True)
            ]
            replayed = pred.replay(shape, fresh)
            eager = pred.eager(*fresh)
            sync()
            diffs, bitwise, bounds = [], True, []
            for r, e in zip(replayed, eager, strict=True):
                r32, e32 = r.float(), e.float()
                diffs.append(float((r32 - e32).abs().max()) if r.numel() else 0.0)
                bitwise = bitwise and bool(torch.equal(r, e))
                bounds.append(options["atol"] + options["rtol"] * (float(e32.abs().max()) if e.numel() else 0.0))
            label = ", ".join(f"{n}{list(s)}" for n, s in zip(names, shape, strict=True))
            bad = [(d, b) for d, b in zip(diffs, bounds, strict=True) if not d <= b]
            if bad:
                d, b = bad[0]
                raise PassError(
                    f"cuda_graph: graph replay differs from the non-graph run for {label}: "
                    f"max abs diff {d:.3g} > {b:.3g}"
                )
            ctx.progress(f"timing {label}")
            it = options["iterations"]
            eager_ms = _p50_ms(lambda fresh=fresh: pred.eager(*fresh), sync, it)
            graph_ms = _p50_ms(lambda shape=shape, fresh=fresh: pred.replay(shape, fresh), sync, it)
            key = str(shape[0][0]) if len({s[0] for s in shape}) == 1 else label
            per_batch[key] = {
                "eager_p50_ms": eager_ms,
                "graph_p50_ms": graph_ms,
                "speedup": eager_ms / graph_ms if graph_ms > 0 else None,
                "max_abs_diff": max(diffs) if diffs else 0.0,
                "bitwise_equal": bitwise,
            }
        cuda = ctx.host.cuda or {}
        metrics = {
            "graphs": len(pred.shapes),
            "backend": backend,
            "per_shape": per_batch,
            "gpu": cuda.get("name"),
            "iterations": options["iterations"],
        }
        meta = {
            **model.meta,
            "input_names": names,
            "backend": backend,
            "model_kind": model.kind,
            "input_dtype": dtypes[0],
        }
        return PassResult(CONFIG_NAME, metrics=metrics, meta=meta)
