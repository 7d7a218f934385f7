"""The tolerance vocabulary, defined once: what a verified stage may be held to.

A tolerance bounds one metric of :func:`accelc.passes.verification.compare_outputs` (or of
:func:`accelc.passes.output_metrics.compare_by_kind` for embeddings and hidden states: ``cosine_min``,
``neighbor_recall``) from below (``min``) or above (``max``). The recipe schema's ``$defs/tolerances``, the options
of ``verify``, and the trial options of ``calibrate`` and ``quantize`` are all
:data:`TOLERANCES_SCHEMA`, generated from :data:`TOLERANCES` (a test checks the recipe
schema against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    """One tolerance: the metric it bounds, whether the metric must stay above (``min``) or below
    (``max``) it, the bound's JSON Schema range, and what it means."""

    metric: str
    sense: str
    description: str
    minimum: float | None = None
    maximum: float | None = None


#: tolerance name -> :class:`Tolerance`, in the order reports and quality keys use.
TOLERANCES: dict[str, Tolerance] = {
    "top1_agreement": Tolerance(
        "top1_agreement", "min", "Minimum share of samples whose arg-max matches the source model.", 0, 1
    ),
    "cosine": Tolerance("cosine", "min", "Minimum mean cosine similarity of the output vectors.", -1, 1),
    "max_abs_error": Tolerance("max_abs_error", "max", "Maximum absolute element-wise difference.", 0),
    "mean_abs_error": Tolerance("mean_abs_error", "max", "", 0),
    "accuracy_drop": Tolerance(
        "accuracy_drop", "max", "Maximum drop of top-1 accuracy against labels (when the data has labels).", 0, 1
    ),
    "cosine_min": Tolerance("cosine_min", "min", "Minimum per-sample cosine similarity (the worst sample).", -1, 1),
    "flip_margin": Tolerance(
        "flip_margin",
        "max",
        "Largest top-1/top-2 logit margin of the source model among samples whose top-1 changes "
        "(0 when none does): with 1, no sample flips where the source model was confident; flips "
        "on near-ties are allowed.",
        0,
    ),
    "neighbor_recall": Tolerance(
        "neighbor_recall",
        "min",
        "Minimum recall@k of each sample's nearest source-model neighbours among the validation set "
        "(embeddings, hidden states).",
        0,
        1,
    ),
}


def tolerances_schema() -> dict[str, Any]:
    """The JSON Schema of a ``{tolerance name: bound}`` object, from :data:`TOLERANCES`."""
    props: dict[str, Any] = {}
    for name, t in TOLERANCES.items():
        spec: dict[str, Any] = {"type": "number"}
        if t.minimum is not None:
            spec["minimum"] = t.minimum
        if t.maximum is not None:
            spec["maximum"] = t.maximum
        if t.description:
            spec["description"] = t.description
        props[name] = spec
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "Bounds a verified stage must meet against the source model on the validation set.",
        "properties": props,
    }


TOLERANCES_SCHEMA: dict[str, Any] = tolerances_schema()


def tolerance_failures(metrics: dict[str, Any], tolerances: dict[str, float]) -> list[str]:
    """Human-readable lines for every tolerance the metrics miss (empty when all hold).

    Outputs with non-finite samples (``nonfinite_samples`` > 0) always fail, tolerances or not;
    a metric that is NaN or ``None`` never satisfies a tolerance (``v < bound`` is False for NaN,
    so a plain comparison would pass it). A tolerance whose metric is absent (``accuracy_drop``
    without labels) is skipped.
    """
    out = []
    bad = metrics.get("nonfinite_samples") or 0
    if bad:
        ref_bad = metrics.get("reference_nonfinite_samples") or 0
        whose = f" (the source model's own outputs in {ref_bad} of them)" if ref_bad else ""
        out.append(f"{bad} of {metrics.get('samples')} samples have non-finite outputs (NaN or Inf){whose}")
    for name, bound in tolerances.items():
        t = TOLERANCES[name]
        if t.metric not in metrics:
            continue
        v = metrics[t.metric]
        rel = ">=" if t.sense == "min" else "<="
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            out.append(f"{t.metric} = {v}, required {rel} {bound:g}")
        elif not ((t.sense == "min" and v >= bound) or (t.sense == "max" and v <= bound)):
            out.append(f"{t.metric} = {v:.6g}, required {rel} {bound:g}")
    return out
