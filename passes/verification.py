"""``verify``: compare a stage's artifact with the source model on the validation set."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import VerificationError
from accelc.pass_api import Pass, PassContext, PassResult, RecipeView, Slot
from accelc.tolerances import TOLERANCES, TOLERANCES_SCHEMA, tolerance_failures  # noqa: F401 (re-exported)

from .loading import iter_batches, load_arrays


def compare_outputs(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of ``out`` against ``ref``, both ``(N, ...)`` float; rows are flattened to vectors.

    Returns ``samples``, ``top1_agreement`` (share of rows with equal arg-max), ``cosine``
    (mean row cosine similarity) and ``cosine_min``, ``max_abs_error``, ``mean_abs_error``;
    with ``labels`` ``(N,)`` also ``accuracy``, ``reference_accuracy`` and ``accuracy_drop``.
    """
    if ref.shape != out.shape:
        raise VerificationError(
            f"output shape {list(out.shape)} differs from the source model's {list(ref.shape)}"
        )
    r = ref.reshape(len(ref), -1).astype(np.float64)
    o = out.reshape(len(out), -1).astype(np.float64)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    cos = np.where(denom > 0, (r * o).sum(1) / np.maximum(denom, 1e-300), 1.0)
    diff = np.abs(r - o)
    m: dict[str, Any] = {
        "samples": int(len(r)),
        "top1_agreement": float((r.argmax(1) == o.argmax(1)).mean()),
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_error": float(diff.max()),
        "mean_abs_error": float(diff.mean()),
    }
    if labels is not None:
        acc, ref_acc = float((o.argmax(1) == labels).mean()), float((r.argmax(1) == labels).mean())
        m.update(accuracy=acc, reference_accuracy=ref_acc, accuracy_drop=max(0.0, ref_acc - acc))
    return m


class Verify(Pass):
    """Run the stage's artifact on the validation set and compare with the source model's outputs.

    Metrics (first output): top-1 agreement, mean/min cosine similarity, max/mean absolute
    error, and accuracy against labels when the data has them. Tolerances are checked
    after the (cached) metrics, so changing a tolerance never re-runs the comparison.
    """

    name = "verify"
    version = "1"
    inputs = (
        Slot("artifact", runnable=True, runs=True),
        Slot("reference", ("reference.outputs",)),
        Slot("data", ("validation.data",)),
    )
    produces = "verification.report"
    final = False
    key_ignores = ("tolerances",)
    env_packages = ("onnxruntime", "torch", "numpy")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "tolerances": {**TOLERANCES_SCHEMA, "default": {}},
            "batch_size": {"type": "integer", "minimum": 1, "default": 16},
            "device": {"enum": ["cpu", "cuda"], "default": "cpu"},
        },
    }

    def configure(self, options: dict[str, Any], recipe: RecipeView, where: str) -> dict[str, Any]:
        """An explicit ``verify`` step checks the recipe's ``verify.tolerances`` unless it sets its own."""
        return {"tolerances": recipe.tolerances, **options}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        data = load_arrays(inputs["data"])
        ref = load_arrays(inputs["reference"])["output0"]
        runner = ctx.runners.make(inputs["artifact"], device=options["device"])
        batch = min(options["batch_size"], ctx.signature.max_batch())
        outs = [runner.run(feeds)[0] for _, feeds in iter_batches(data, ctx.signature.names, batch)]
        metrics = compare_outputs(ref, np.concatenate(outs), data.get("labels"))
        metrics["stage_kind"] = inputs["artifact"].kind
        (ctx.workdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return PassResult("metrics.json", metrics=metrics)

    def check(self, result_metrics: dict[str, Any], options: dict[str, Any]) -> None:
        failures = tolerance_failures(result_metrics, options.get("tolerances", {}))
        if failures:
            raise VerificationError("; ".join(failures) + _hint(result_metrics.get("stage_kind")))


#: What to change when a quantized stage misses its tolerances (recipe fields, as the user writes them).
INT8_HINT = (
    " (INT8 moved the outputs too far: in passes, set calibrate: {method: auto} to try min-max, entropy "
    "and percentile ranges and keep the best, and quantize: {fallback: auto} to keep the most sensitive "
    "nodes in float until the tolerances hold; or loosen verify.stages.quantize; see accelc passes quantize)"
)


def _hint(kind: str | None) -> str:
    return INT8_HINT if kind == "onnx.qdq" else ""
