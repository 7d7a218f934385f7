"""Source passes: ``load_model``, ``load_data`` and ``reference`` (the source model's outputs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import PassError
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

        model = ctx.sources.model_sources[options["source"]].load(options)
        torch.save(model, ctx.workdir / "model.pt")
        params = sum(p.numel() for p in model.parameters())
        meta = {
            "input_names": ctx.signature.names,
            "pythonpath": [options["path"]] if options.get("path") else [],
        }
        return PassResult("model.pt", metrics={"parameters": params}, meta=meta)


class LoadData(Pass):
    """Read a dataset through its data source and store the preprocessed arrays (``<role>.data``).

    Output: ``data.npz`` with one array per model input, ``(N, *shape[1:])``, and optional ``labels`` ``(N,)`` int64.
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
        arrays = ctx.sources.data_sources[spec["source"]].load(spec, ctx.signature)
        np.savez(ctx.workdir / "data.npz", **arrays)
        n = len(next(iter(arrays.values())))
        return PassResult("data.npz", metrics={"samples": n, "labels": "labels" in arrays})


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
        return PassResult("outputs.npz", metrics={"samples": int(sum(len(b) for b in outs[0]))})
