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
from .output_metrics import OUTPUT_KINDS, compare_by_kind, infer_output_kind

#: Settings of the recipe's ``verify`` section that say how outputs are compared (and how a
#: degenerate reference is treated): options of ``verify``, read by passes that compare outputs.
COMPARISON_OPTIONS = ("output", "recall_k", "degenerate")


def compare_outputs(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of ``out`` against ``ref``, both ``(N, ...)`` float; rows are flattened to vectors.

    Returns ``samples``, ``nonfinite_samples`` (rows where either output holds a NaN or an
    infinity), and over the finite rows ``top1_agreement`` (share of rows with equal arg-max),
    ``flip_margin`` (the largest ``ref`` top-1 minus top-2 value among the rows whose arg-max
    differs, 0 when none does; ``None`` for rows of one value), ``cosine`` (mean row cosine
    similarity) and ``cosine_min``, ``max_abs_error``, ``mean_abs_error``; with ``labels``
    ``(N,)`` also ``accuracy``, ``reference_accuracy`` and ``accuracy_drop``. A metric with no
    finite row to measure is ``None``. Non-finite rows never count as agreeing:
    :func:`tolerance_failures` fails any result that has them.
    """
    if ref.shape != out.shape:
        raise VerificationError(
            f"output shape {list(out.shape)} differs from the source model's {list(ref.shape)}"
        )
    r_all = ref.reshape(len(ref), -1).astype(np.float64)
    o_all = out.reshape(len(out), -1).astype(np.float64)
    finite = np.isfinite(r_all).all(1) & np.isfinite(o_all).all(1)
    r, o = r_all[finite], o_all[finite]
    m: dict[str, Any] = {
        "samples": int(len(r_all)),
        "nonfinite_samples": int((~finite).sum()),
        "reference_nonfinite_samples": int((~np.isfinite(r_all).all(1)).sum()),
    }
    if len(r) == 0:
        m.update(
            top1_agreement=None, flip_margin=None, cosine=None, cosine_min=None, max_abs_error=None, mean_abs_error=None
        )
        if labels is not None:
            m.update(accuracy=None, reference_accuracy=None, accuracy_drop=None)
        return m
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    cos = np.where(denom > 0, (r * o).sum(1) / np.maximum(denom, 1e-300), 1.0)
    diff = np.abs(r - o)
    flipped = r.argmax(1) != o.argmax(1)
    margin = None
    if r.shape[1] >= 2:
        top2 = np.partition(r, -2, axis=1)[:, -2:]
        margin = float((top2[:, 1] - top2[:, 0])[flipped].max()) if flipped.any() else 0.0
    m.update(
        top1_agreement=float(1.0 - flipped.mean()),
        flip_margin=margin,
        cosine=float(cos.mean()),
        cosine_min=float(cos.min()),
        max_abs_error=float(diff.max()),
        mean_abs_error=float(diff.mean()),
    )
    if labels is not None:
        lab = np.asarray(labels)[finite]
        acc, ref_acc = float((o.argmax(1) == lab).mean()), float((r.argmax(1) == lab).mean())
        m.update(accuracy=acc, reference_accuracy=ref_acc, accuracy_drop=max(0.0, ref_acc - acc))
    return m


class Verify(Pass):
    """Run the stage's artifact on the validation set and compare with the source model's outputs.

    Metrics (first output) fit the output's kind (:mod:`accelc.passes.output_metrics`): for
    ``(N, classes)`` outputs top-1 agreement, mean/min cosine similarity, max/mean absolute error,
    and accuracy against labels when the data has them; for embeddings and hidden states cosine per
    sample and neighbour recall@k, padded positions masked. Non-finite samples are counted and fail
    the stage; a degenerate reference (outputs that do not vary) fails it unless ``degenerate:
    warn``. Tolerances are checked after the (cached) metrics, so changing a tolerance never
    re-runs the comparison.
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
    key_ignores = ("tolerances", "degenerate")
    env_packages = ("onnxruntime", "torch", "numpy")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "tolerances": TOLERANCES_SCHEMA,
            "batch_size": {"type": "integer", "minimum": 1, "default": 16},
            "device": {"enum": ["cpu", "cuda"], "default": "cpu"},
            "output": {
                "enum": ["auto", *OUTPUT_KINDS],
                "description": "How outputs are compared (accelc.passes.output_metrics); auto (unset: the "
                "recipe's verify.output, else auto): what the model source declares, else classes for (N, C), "
                "hidden_states for (N, S, D).",
            },
            "recall_k": {
                "type": "integer",
                "minimum": 1,
                "description": "k of neighbour recall@k (unset: the recipe's verify.recall_k, else 5).",
            },
            "degenerate": {
                "enum": ["fail", "warn"],
                "description": "A reference whose outputs do not vary over the samples: fail the stage or warn "
                "(unset: the recipe's verify.degenerate, else fail).",
            },
        },
    }

    def configure(self, options: dict[str, Any], recipe: RecipeView, where: str) -> dict[str, Any]:
        """The recipe's ``verify.tolerances`` unless the step sets its own (the verify nodes lowering
        inserts arrive with their stage's), and the recipe's comparison settings (``verify.output``,
        ``recall_k``, ``degenerate``: :data:`COMPARISON_OPTIONS`) unless the step sets them."""
        settings = {k: recipe.verify[k] for k in COMPARISON_OPTIONS if k in recipe.verify}
        return {"tolerances": recipe.tolerances, **settings, **options}

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
            raise VerificationError("; ".join(failures) + _hint(result_metrics.get("stage_kind")))


#: What to change when a quantized stage misses its tolerances (recipe fields, as the user writes them).
INT8_HINT = (
    " (INT8 moved the outputs too far: in passes, set calibrate: {method: auto} to try min-max, entropy "
    "and percentile ranges and keep the best, and quantize: {fallback: auto} to keep the most sensitive "
    "nodes in float until the tolerances hold; or loosen verify.stages.quantize; see accelc passes quantize)"
)


def _hint(kind: str | None) -> str:
    return INT8_HINT if kind == "onnx.qdq" else ""
