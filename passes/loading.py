"""Source passes: ``load_model``, ``load_data`` and ``reference`` (the source model's outputs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import DataError, PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot


class LoadModel(Pass):
    """Build the recipe's model from its model source and save it in eval mode (``torch.module``).

    Options are the recipe's ``model`` mapping; the cache key uses the source's identity
    (weights sha256, code sha256 or package version), not file paths.
    """

    name = "load_model"
    version = "1"
    produces = "torch.module"
    final = False
    options_schema = {"type": "object", "required": ["source"]}
    env_packages = ("torch",)

    def key_material(self, options: dict[str, Any], host: Any, sources: Any) -> dict[str, Any]:
        return {
            "source": options["source"],
            "identity": sources.model_sources[options["source"]].identity(options),
        }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import torch

        source = ctx.sources.model_sources[options["source"]]
        what = f"model source '{options['source']}'" + (f" ({options['callable']})" if options.get("callable") else "")
        model = ctx.call_user_code(what, lambda: source.load(options))
        torch.save(model, ctx.workdir / "model.pt")
        params = sum(p.numel() for p in model.parameters())
        meta = {
            "input_names": ctx.signature.names,
            "pythonpath": [options["path"]] if options.get("path") and options["source"] == "python" else [],
        }
        if getattr(model, "accelc_output_kind", None):  # e.g. embedding: verify compares accordingly
            meta["output_kind"] = model.accelc_output_kind
        if getattr(model, "accelc_model_config", None):  # heads, hidden size: for the transformer optimizer
            meta["model_config"] = model.accelc_model_config
        return PassResult("model.pt", metrics={"parameters": params}, meta=meta)


class LoadData(Pass):
    """Read a dataset through its data source and store the preprocessed arrays (``<role>.data``).

    Output: ``data.npz`` with one array per model input, ``(N, *shape[1:])``, and optional ``labels`` ``(N,)`` int64.

    Raises:
        DataError: the data holds 0 samples, or a float input holds NaN or infinite values
            (naming the file and the first affected samples), so no tolerance is ever checked on them.
    """

    name = "load_data"
    version = "1"
    produces = "calibration.data"  # or validation.data, by role (see output_kind)
    final = False
    options_schema = {
        "type": "object",
        "required": ["role", "spec"],
        "properties": {
            "role": {
                "enum": ["calibration", "validation"],
                "description": "Which dataset: the recipe's data.calibration or data.validation (set by lowering).",
            },
            "spec": {
                "type": "object",
                "description": "That dataset's entry, as the recipe writes it (set by lowering); its options are "
                "the data source's: see `accelc sources images` / `accelc sources tensors`.",
            },
        },
    }

    def output_kind(self, options: dict[str, Any]) -> str:
        return f"{options['role']}.data"

    def key_material(self, options: dict[str, Any], host: Any, sources: Any) -> dict[str, Any]:
        spec = options["spec"]
        return {
            "role": options["role"],
            "source": spec["source"],
            "identity": sources.data_sources[spec["source"]].identity(spec),
        }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        spec = options["spec"]
        source = ctx.sources.data_sources[spec["source"]]
        arrays = source.load(spec, ctx.signature)
        where = f"data.{options['role']}" + next(
            (f" ({spec[k]})" for k in ("tensors", "images", "path", "file", "text") if isinstance(spec.get(k), str)), ""
        )
        n = len(next(iter(arrays.values()))) if arrays else 0
        if n == 0:
            raise DataError(f"{where}: holds 0 samples; calibration and verification need at least one")
        for name, a in arrays.items():
            a = np.asarray(a)
            if a.dtype.kind in "fc" and a.size:
                bad = ~np.isfinite(a.reshape(len(a), -1)).all(1)
                if bad.any():
                    first = [int(i) for i in np.flatnonzero(bad)[:5]]
                    raise DataError(
                        f"{where}: input '{name}' holds NaN or infinite values in {int(bad.sum())} of {len(a)} "
                        f"samples (first: sample {', '.join(map(str, first))}); every input value must be finite"
                    )
        np.savez(ctx.workdir / "data.npz", **arrays)
        # a source may report facts of the load (the text source: sentences truncated, padded length)
        extra = dict(getattr(source, "last_stats", None) or {})
        return PassResult("data.npz", metrics={"samples": n, "labels": "labels" in arrays, **extra})


def load_arrays(artifact: Artifact) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` artifact, loaded into memory (no pickles allowed)."""
    with np.load(artifact.file, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def iter_batches(arrays: dict[str, np.ndarray], names: list[str], batch: int):
    """Yield ``(start, {name: array[start:start+batch]})`` over the sample axis."""
    n = len(arrays[names[0]])
    for s in range(0, n, batch):
        yield s, {k: arrays[k][s : s + batch] for k in names}


class Reference(Pass):
    """Outputs of the unmodified source model on the validation set (``reference.outputs``).

    Every ``verify`` stage compares against these. Output: ``outputs.npz`` with
    ``output0..k``, float32, ``(N, ...)``.
    """

    name = "reference"
    version = "1"
    inputs = (Slot("model", ("torch.module",), source=True), Slot("data", ("validation.data",)))
    produces = "reference.outputs"
    final = False
    env_packages = ("torch",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"batch_size": {"type": "integer", "minimum": 1, "default": 16}},
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        runner = ctx.runners.make(inputs["model"], device="cpu")
        data = load_arrays(inputs["data"])
        outs: list[list[np.ndarray]] = []
        for _, feeds in iter_batches(data, ctx.signature.names, options["batch_size"]):
            res = runner.run(feeds)
            if not outs:
                outs = [[] for _ in res]
            for acc, r in zip(outs, res, strict=True):
                acc.append(r.astype(np.float32))
        if not outs:
            raise PassError("reference: the validation set is empty")
        np.savez(ctx.workdir / "outputs.npz", **{f"output{i}": np.concatenate(o) for i, o in enumerate(outs)})
        kind = inputs["model"].meta.get("output_kind")
        return PassResult(
            "outputs.npz",
            metrics={"samples": int(sum(len(b) for b in outs[0]))},
            meta={"output_kind": kind} if kind else {},
        )
