"""``verify``: compare a stage's artifact with the source model on the validation set."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from accelc.artifacts import RUNNABLE_KINDS, Artifact
from accelc.errors import VerificationError
from accelc.pass_api import Pass, PassContext, PassResult, Slot

from .loading import iter_batches, load_arrays
from .output_metrics import OUTPUT_KINDS, compare_by_kind, infer_output_kind

#: tolerance name -> (metric, "min" | "max"): whether the metric must stay above or below it.
TOLERANCES = {
    "top1_agreement": ("top1_agreement", "min"),
    "cosine": ("cosine", "min"),
    "max_abs_error": ("max_abs_error", "max"),
    "mean_abs_error": ("mean_abs_error", "max"),
    "accuracy_drop": ("accuracy_drop", "max"),
    "cosine_min": ("cosine_min", "min"),
    "neighbor_recall": ("neighbor_recall", "min"),
}


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


def tolerance_failures(metrics: dict[str, Any], tolerances: dict[str, float]) -> list[str]:
    """Human-readable lines for every tolerance the metrics miss (empty when all hold)."""
    out = []
    for tol, bound in tolerances.items():
        metric, sense = TOLERANCES[tol]
        if metric not in metrics:
            continue
        v = metrics[metric]
        if (sense == "min" and v < bound) or (sense == "max" and v > bound):
            rel = ">=" if sense == "min" else "<="
            out.append(f"{metric} = {v:.6g}, required {rel} {bound:g}")
    return out


class Verify(Pass):
    """Run the stage's artifact on the validation set and compare with the source model's outputs.

    Metrics (first output): top-1 agreement, mean/min cosine similarity, max/mean absolute
    error, and accuracy against labels when the data has them. Tolerances are checked
    after the (cached) metrics, so changing a tolerance never re-runs the comparison.
    """

    name = "verify"
    version = "1"
    inputs = (
        Slot("artifact", RUNNABLE_KINDS),
        Slot("reference", ("reference.outputs",)),
        Slot("data", ("validation.data",)),
    )
    produces = "verification.report"
    final = False
    key_ignores = ("tolerances", "degenerate")
    env_packages = ("onnxruntime", "torch", "numpy")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "tolerances": {
                "type": "object",
                "default": {},
                "propertyNames": {"enum": list(TOLERANCES)},
                "additionalProperties": {"type": "number"},
            },
            "batch_size": {"type": "integer", "minimum": 1, "default": 16},
            "device": {"enum": ["cpu", "cuda"], "default": "cpu"},
            "output": {
                "enum": ["auto", *OUTPUT_KINDS],
                "default": "auto",
                "description": "How outputs are compared (accelc.passes.output_metrics); auto: what the model "
                "source declares, else classes for (N, C), hidden_states for (N, S, D).",
            },
            "recall_k": {"type": "integer", "minimum": 1, "default": 5, "description": "k of neighbour recall@k."},
            "degenerate": {
                "enum": ["fail", "warn"],
                "default": "fail",
                "description": "A reference whose outputs do not vary over the samples: fail the stage or warn.",
            },
        },
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        data = load_arrays(inputs["data"])
        ref = load_arrays(inputs["reference"])["output0"]
        runner = ctx.runners.make(inputs["artifact"], device=options["device"])
        batch = min(options["batch_size"], ctx.signature.max_batch())
        outs = [runner.run(feeds)[0] for _, feeds in iter_batches(data, ctx.signature.names, batch)]
        declared = None if options.get("output", "auto") == "auto" else options["output"]
        kind = infer_output_kind(ref, declared or inputs["reference"].meta.get("output_kind"), data.get("labels"))
        metrics = compare_by_kind(
            ref, np.concatenate(outs), kind, labels=data.get("labels"), mask=data.get("attention_mask"),
            k=options.get("recall_k", 5),
        )
        metrics["stage_kind"] = inputs["artifact"].kind
        (ctx.workdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return PassResult("metrics.json", metrics=metrics)

    def check(self, result_metrics: dict[str, Any], options: dict[str, Any]) -> None:
        failures = tolerance_failures(result_metrics, options.get("tolerances", {}))
        reason = result_metrics.get("degenerate_reference")
        if reason and options.get("degenerate", "fail") == "fail":
            failures.insert(0, f"the reference cannot judge this stage: {reason} (verify.degenerate: warn to accept)")
        if failures:
            raise VerificationError("; ".join(failures))
