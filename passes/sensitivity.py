"""Accuracy-aware INT8: score quantization trials, rank nodes by sensitivity, search the fallback set.

The helpers behind ``calibrate`` with ``method: auto`` and ``quantize`` with ``fallback: auto``.
They work on ONNX files and numpy arrays only; nothing here reads the recipe or the cache.

Terms:

* A **trial** is one real quantized model (``quantize_static`` with one calibration table
  and one ``nodes_to_exclude`` list, excluded nodes pinned to float as
  :func:`accelc.passes.qdq.pin_float_nodes` explains), run on the recipe's runtime on the
  validation set and compared with the source model's outputs by
  :func:`accelc.passes.verification.compare_outputs`, so its numbers are the ones a ``verify``
  stage reports for that model.
* A **fallback unit** is a node that ONNX Runtime's quantizer quantized, together with the
  activation (``Clip``, ``Relu``) it folded into the node's output range. Keeping a unit in
  float excludes all its nodes; a folded activation rides with its node.
* **Sensitivity** is measured one unit at a time against the float graph: the model with
  *only* that unit quantized (``quantize_static(nodes_to_quantize=unit)``: its weights and
  the activations it reads and writes) is run on a subset of the *calibration* set and
  compared with the float model there. The loss of mean cosine similarity ranks the units
  (ties: mean absolute error). This is the per-layer analysis of Nagel et al., "A White
  Paper on Neural Network Quantization" (2021): quantize layers one at a time to find the
  ones that carry the error. Each unit costs one small ``quantize_static`` and one pass over
  the samples, so the analysis is linear in the number of units. Ranking on calibration data
  keeps the validation set for the accept/reject decision only. With ``bias_correction`` on
  (the default) each one-unit model is bias-corrected like every trial
  (:mod:`accelc.passes.bias_correction`), so the ranking measures the error that correction
  leaves, which is what the fallback has to remove.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.pass_api import PassContext
from accelc.runners import SessionFactoryFn, default_threads
from accelc.tolerances import TOLERANCES, tolerance_failures

from .loading import iter_batches, load_arrays
from .verification import compare_outputs

#: Ops ONNX Runtime's QDQ quantizer may fold into the preceding node's output range.
FOLDABLE_ACTIVATIONS = ("Clip", "Relu")


def _session(session: SessionFactoryFn | None) -> SessionFactoryFn:
    if session is not None:
        return session
    from .onnxruntime import ort_trial_session

    return ort_trial_session


class Evaluator:
    """Runs ONNX models on fixed inputs and compares their first output with reference outputs.

    Args:
        arrays: model inputs, ``{name: (N, ...)}`` (extra keys such as ``labels`` are ignored).
        names: the model's input names, in order.
        reference: ``(N, ...)`` float outputs to compare with (the source model's, or the float model's).
        batch: samples per ``session.run`` (must fit the model's batch dimension).
        threads: intra-op threads (``None``: the runtime's default).
        labels: optional ``(N,)`` int64 labels, passed on to :func:`compare_outputs`.
        runtime: the name of the runtime that runs the models (recorded in reports): the runtime
            that will deploy them, since ONNX Runtime and OpenVINO round INT8 differently.
        session: that runtime's session factory (:attr:`accelc.runners.Runtime.session`, or
            ``ctx.runners.session`` bound to it); ``None``: ONNX Runtime's.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        names: list[str],
        reference: np.ndarray,
        batch: int,
        threads: int | None,
        labels: np.ndarray | None = None,
        runtime: str = "onnxruntime",
        session: SessionFactoryFn | None = None,
    ):
        self.runtime = runtime
        self.session = _session(session)
        self.arrays = {k: arrays[k] for k in names}
        self.names = names
        self.reference = reference
        self.batch = batch
        self.threads = threads
        self.labels = labels

    def outputs(self, model: str | Path) -> np.ndarray:
        """First output of the ONNX file ``model`` on all samples, float32 ``(N, ...)``."""
        sess = self.session(model, threads=self.threads)
        return np.concatenate(
            [np.asarray(sess.run(f)[0], dtype=np.float32) for _, f in iter_batches(self.arrays, self.names, self.batch)]
        )

    def metrics(self, model: str | Path) -> dict[str, Any]:
        """:func:`compare_outputs` of ``model`` against the reference (``samples``, ``top1_agreement``, ...)."""
        return compare_outputs(self.reference, self.outputs(model), self.labels)


def quality_key(metrics: dict[str, Any], tolerances: dict[str, float]) -> tuple[float, ...]:
    """Sort key, larger is better: fewer missed tolerances first, then each toleranced metric
    (in :data:`TOLERANCES` order, sign flipped for error metrics), then mean cosine, then
    minus mean absolute error. Used to pick the best calibration trial."""
    key: list[float] = [-float(len(tolerance_failures(metrics, tolerances)))]
    for name, t in TOLERANCES.items():
        if name in tolerances and t.metric in metrics:
            key.append(metrics[t.metric] if t.sense == "min" else -metrics[t.metric])
    key += [metrics.get("cosine", 0.0), -metrics.get("mean_abs_error", 0.0)]
    return tuple(key)


def p50_latency_ms(
    models: dict[str, str | Path],
    feeds: dict[str, np.ndarray],
    threads: int | None,
    iterations: int,
    rounds: int = 5,
    warmup: int = 5,
    session: SessionFactoryFn | None = None,
) -> dict[str, float]:
    """Median batch latency in ms of each model, measured side by side in this process.

    The ``iterations`` timed runs per model are split into ``rounds`` interleaved rounds
    (model A, B, C, A, B, C, ...) so that load from other processes on a shared machine
    hits all models alike. Each model gets ``warmup`` untimed runs first. ``time.perf_counter``
    around one run of a ``session`` (a runtime's session factory; ``None``: ONNX Runtime's),
    host outputs included.
    """
    make = _session(session)
    sessions = {k: make(p, threads=threads) for k, p in models.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(feeds)
    per_round = max(1, iterations // max(1, rounds))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(max(1, rounds)):
        for k, s in sessions.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                s.run(feeds)
                times[k].append(time.perf_counter() - t0)
    return {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}


@dataclass(frozen=True)
class Unit:
    """A fallback unit: ``name`` (the quantized node), its ``op_type``, and ``nodes``
    (the node and the activations folded into it), all names of nodes in the float graph."""

    name: str
    op_type: str
    nodes: tuple[str, ...]


def fallback_units(
    float_model: Any, qdq_model: Any, op_types: set[str] | frozenset[str], exclude: tuple[str, ...] | list[str] = ()
) -> list[Unit]:
    """The units of ``qdq_model`` (an ``onnx.ModelProto`` made from ``float_model``), in graph order.

    A node counts as quantized when its type is one the quantizer handles (``op_types``) and
    one of its inputs comes from a ``DequantizeLinear`` (a float node merely reading a
    dequantized tensor has an input from a ``DequantizeLinear`` too, but not the type).
    Float-graph nodes of :data:`FOLDABLE_ACTIVATIONS` types that the quantizer removed and
    that read a quantized node's output are attached to that node's unit. Nodes in
    ``exclude`` (already kept in float) are skipped.
    """
    dq_out = {o for n in qdq_model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    in_qdq = {n.name for n in qdq_model.graph.node}
    consumers: dict[str, list[Any]] = {}
    for n in float_model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    float_nodes = {n.name: n for n in float_model.graph.node}
    units = []
    for n in qdq_model.graph.node:
        if n.op_type not in op_types or n.name in exclude or n.name not in float_nodes:
            continue
        if not any(i in dq_out for i in n.input):
            continue
        # the quantizer rewires a node to its folded activation's output, so follow the float graph
        folded = [
            c.name
            for o in float_nodes[n.name].output
            for c in consumers.get(o, [])
            if c.op_type in FOLDABLE_ACTIVATIONS and c.name not in in_qdq and c.name not in exclude
        ]
        units.append(Unit(n.name, n.op_type, (n.name, *folded)))
    return units


def rank_units(
    units: list[Unit],
    quantize_only: Callable[[list[str]], Path],
    evaluator: Evaluator,
    progress: Callable[..., None] = lambda *_a: None,
) -> list[dict[str, Any]]:
    """Sensitivity of each unit, most sensitive first (``progress(message, done, total)`` before each).

    Args:
        units: candidates, from :func:`fallback_units`.
        quantize_only: ``nodes -> path`` of a model with only those nodes quantized.
        evaluator: compares with the *float* model's outputs on the analysis samples.

    Returns rows ``{"rank", "node", "op_type", "nodes", "cosine_loss", "cosine",
    "top1_agreement", "mean_abs_error"}``; ``cosine_loss`` is ``1 - cosine`` of the model
    with only this unit quantized (0 for a unit that changes nothing).
    """
    rows = []
    for i, u in enumerate(units):
        progress("sensitivity: one node quantized at a time", i, len(units))
        m = evaluator.metrics(quantize_only(list(u.nodes)))
        progress("sensitivity: one node quantized at a time", i + 1, len(units))
        rows.append(
            {
                "node": u.name,
                "op_type": u.op_type,
                "nodes": list(u.nodes),
                "cosine_loss": max(0.0, 1.0 - m["cosine"]),
                "cosine": m["cosine"],
                "top1_agreement": m["top1_agreement"],
                "mean_abs_error": m["mean_abs_error"],
            }
        )
    rows.sort(key=lambda r: (-r["cosine_loss"], -r["mean_abs_error"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def search_fallback(
    ranking: list[dict[str, Any]], max_units: int, trial: Callable[[int], dict[str, Any]], strategy: str = "greedy"
) -> dict[str, Any] | None:
    """Find how many of the most sensitive units to keep in float so that the tolerances hold.

    ``trial(k)`` builds and verifies the model with the first ``k`` ranked units excluded
    and returns its record with ``passed`` (bool). ``k = 0`` is assumed already tried and failed.

    * ``greedy``: ``k = 1, 2, ...`` until a trial passes (at most ``max_units`` trials): the
      smallest passing ``k`` in ranking order, whatever the shape of the metric.
    * ``bisect``: try ``k = max_units`` first and stop if it fails (were the metric monotone in
      ``k``, no smaller ``k`` could pass), then halve the interval between the largest failing
      and the smallest passing ``k`` (``1 + ceil(log2(max_units))`` trials). The metric need not
      be monotone, so the result is a passing ``k``, not necessarily the smallest one, and a
      failing ``max_units`` may hide a smaller ``k`` that passes.

    Returns the record of the passing trial that was kept, or ``None`` when none passed.
    """
    top = min(max_units, len(ranking))
    if top <= 0:
        return None
    if strategy == "greedy":
        for k in range(1, top + 1):
            rec = trial(k)
            if rec["passed"]:
                return rec
        return None
    best = trial(top)
    if not best["passed"]:
        return None
    lo, hi = 0, top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        rec = trial(mid)
        if rec["passed"]:
            hi, best = mid, rec
        else:
            lo = mid
    return best


#: Metrics copied from a verification into a trial record.
_TRIAL_METRICS = (
    "top1_agreement",
    "cosine",
    "cosine_min",
    "max_abs_error",
    "mean_abs_error",
    "accuracy",
    "accuracy_drop",
)


def _trial_record(metrics: dict[str, Any], tolerances: dict[str, float]) -> dict[str, Any]:
    failures = tolerance_failures(metrics, tolerances)
    rec = {k: metrics[k] for k in _TRIAL_METRICS if k in metrics}
    rec.update(passed=not failures, failures=failures)
    return rec


def trial_session(ctx: PassContext, runtime: str) -> SessionFactoryFn:
    """The session factory of ``runtime``, through the runtime hook (``ctx.runners.session``)."""

    def make(model: Any, threads: int | None = None) -> Any:
        return ctx.runners.session(model, threads=threads, runtime=runtime)

    return make


def _validation_evaluator(
    inputs: dict[str, Artifact], ctx: PassContext, batch: int, runtime: str = "onnxruntime"
) -> Evaluator:
    data = load_arrays(inputs["validation"])
    ref = load_arrays(inputs["reference"])["output0"]
    batch = min(batch, ctx.signature.max_batch())
    labels = data.get("labels")
    session = trial_session(ctx, runtime)
    return Evaluator(data, ctx.signature.names, ref, batch, default_threads(), labels, runtime, session)


def _latency_feeds(evaluator: Evaluator) -> dict[str, np.ndarray]:
    return {k: v[:1] for k, v in evaluator.arrays.items()}

