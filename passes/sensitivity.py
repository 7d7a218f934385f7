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
  *only* that unit quantized (its weights and the activations it reads and writes, as the full
  INT8 model quantizes them: :func:`only_unit_model`, the same graph as
  ``quantize_static(nodes_to_quantize=unit)``) is run on a subset of the *calibration* set and
  compared with the float model there. The loss of mean cosine similarity ranks the units
  (ties: mean absolute error). This is the per-layer analysis of Nagel et al., "A White
  Paper on Neural Network Quantization" (2021): quantize layers one at a time to find the
  ones that carry the error. Each unit's model is cut from the full INT8 model, bias
  correction included, so a unit costs one session and one pass over the samples, and
  the analysis is linear in the number of units (times the model's cost). Ranking on
  calibration data keeps the validation set for the accept/reject decision only.
  :func:`rank_units_sqnr` ranks from one instrumented run instead (faster, less faithful).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.pass_api import PassContext
from accelc.runners import SessionFactoryFn, default_threads
from accelc.timing import TimedModel, time_models
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
    ctx: PassContext,
    models: dict[str, str | Path],
    feeds: dict[str, np.ndarray],
    runtime: str,
    iterations: int,
    warmup: int = 5,
) -> dict[str, float | None]:
    """Median batch latency in ms of each ONNX model on ``runtime``, timed the way a deployment runs:
    in a worker process, each model opened only after the previous one was released
    (:func:`accelc.timing.time_models` with ``share_process``), never beside the build's own sessions.
    ``None`` for a model that could not be timed. ``time.perf_counter`` around one ``run``, host
    outputs included, after ``warmup`` untimed runs; threads: :func:`default_threads`."""
    timed = time_models(
        [TimedModel(k, onnx=Path(p), runtime=runtime) for k, p in models.items()],
        {"1": feeds}, threads=default_threads(), warmup=warmup, iterations=iterations,
        runners=ctx.runners, scratch=ctx.scratch, share_process=True, progress=ctx.progress,
    )
    return {k: timed[k].p50_ms("1") for k in models}


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


def _wiring(model: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """``({tensor: producing node}, {tensor: consuming nodes})`` of an ``onnx.ModelProto``'s graph."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def only_unit_model(float_model: Any, qdq_model: Any, unit: Unit) -> bytes:
    """The float model with only ``unit`` quantized, as the QDQ model quantizes it, serialized.

    Built by graph surgery instead of a ``quantize_static`` call per unit: the unit's node is
    taken from ``qdq_model`` with the QuantizeLinear/DequantizeLinear chains on its inputs (its
    activations' Q/DQ pairs, its INT8 weight and INT32 bias, already bias-corrected when the QDQ
    model is) and on its output, and put in place of the float node; folded activations stay as
    float nodes after it, where they change nothing (the output range already clips like them).
    So the unit reads and writes INT8-rounded tensors and everything else is float.

    Raises:
        ValueError: ``unit`` is not a node of both models.
    """
    import onnx

    f_nodes = {n.name: n for n in float_model.graph.node}
    q_nodes = {n.name: n for n in qdq_model.graph.node}
    if unit.name not in f_nodes or unit.name not in q_nodes:
        raise ValueError(f"sensitivity: node '{unit.name}' is not in both the float and the QDQ model")
    producer, consumers = _wiring(qdq_model)
    q_inits = {t.name: t for t in qdq_model.graph.initializer}
    qn = q_nodes[unit.name]
    node = onnx.NodeProto()
    node.CopyFrom(qn)
    chain: list[Any] = []
    for k, i in enumerate(qn.input):
        dq = producer.get(i)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        # copies with fresh output names: the QDQ model reuses float names (a bias keeps its own)
        dq2 = onnx.NodeProto()
        dq2.CopyFrom(dq)
        dq2.output[0] = f"{dq.output[0]}__accelc_only"
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            q2 = onnx.NodeProto()
            q2.CopyFrom(q)
            q2.output[0] = dq2.input[0] = f"{q.output[0]}__accelc_only"
            chain.append(q2)
        chain.append(dq2)
        node.input[k] = dq2.output[0]
    f_out = f_nodes[unit.name].output[0]
    tail: list[Any] = []
    qq = next((c for c in consumers.get(qn.output[0], []) if c.op_type == "QuantizeLinear"), None)
    dd = next((c for c in consumers.get(qq.output[0], []) if c.op_type == "DequantizeLinear"), None) if qq else None
    if qq is not None and dd is not None:
        raw = f"{qn.output[0]}__accelc_only"
        node.output[0] = raw
        qq2, dd2 = onnx.NodeProto(), onnx.NodeProto()
        qq2.CopyFrom(qq)
        dd2.CopyFrom(dd)
        qq2.input[0] = raw
        qq2.output[0] = dd2.input[0] = f"{qq.output[0]}__accelc_only"
        dd2.output[0] = f_out  # the float graph's consumers read the unit's output by its float name
        tail = [qq2, dd2]
    else:
        node.output[0] = f_out
    m = onnx.ModelProto()
    m.CopyFrom(float_model)
    have = {t.name for t in m.graph.initializer}
    needed = {i for n in [*chain, node, *tail] for i in n.input if i in q_inits and i not in have}
    m.graph.initializer.extend(q_inits[i] for i in sorted(needed))
    ordered = []
    for n in m.graph.node:
        if n.name == unit.name:
            ordered += [*chain, node, *tail]
        else:
            ordered.append(n)
    del m.graph.node[:]
    m.graph.node.extend(ordered)
    for op in qdq_model.opset_import:  # com.microsoft, for instance, when the QDQ model uses it
        if op.domain not in {o.domain for o in m.opset_import}:
            m.opset_import.append(op)
    return m.SerializeToString()


def rank_units(
    units: list[Unit],
    quantize_only: Callable[[Unit], Path | bytes],
    evaluator: Evaluator,
    progress: Callable[..., None] = lambda *_a: None,
) -> list[dict[str, Any]]:
    """Sensitivity of each unit, most sensitive first (``progress(message, done, total)`` before each).

    Args:
        units: candidates, from :func:`fallback_units`.
        quantize_only: ``unit -> model`` (path or serialized bytes) with only that unit quantized
            (:func:`only_unit_model`).
        evaluator: compares with the *float* model's outputs on the analysis samples.

    Returns rows ``{"rank", "node", "op_type", "nodes", "cosine_loss", "cosine",
    "top1_agreement", "mean_abs_error"}``; ``cosine_loss`` is ``1 - cosine`` of the model
    with only this unit quantized (0 for a unit that changes nothing).
    """
    rows = []
    for i, u in enumerate(units):
        progress("sensitivity: one node quantized at a time", i, len(units))
        m = evaluator.metrics(quantize_only(u))
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


def exposed(model: Any, tensors: list[str]) -> tuple[bytes, list[str]]:
    """``model`` (ModelProto, left unchanged) serialized with ``tensors`` added as graph outputs
    (float, shape unknown), and the output names in the order a session returns them: the
    model's own, then the added ones not already among them."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [o.name for o in m.graph.output]
    for t in tensors:
        if t not in names:
            m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
            names.append(t)
    return m.SerializeToString(), names


def rank_units_sqnr(
    units: list[Unit],
    float_model: Any,
    qdq_model: Any,
    arrays: dict[str, np.ndarray],
    names: list[str],
    batch: int,
    threads: int | None,
    session: SessionFactoryFn | None = None,
) -> list[dict[str, Any]]:
    """Sensitivity of each unit from one instrumented run of the float and the QDQ model.

    For each unit, the relative noise power (noise-to-signal ratio, ``NSR = ||x_q - x_f||^2 /
    ||x_f||^2`` over the samples) of the tensor it writes, as the next nodes read it (after its
    output QuantizeLinear/DequantizeLinear), against the float model's same tensor, minus the
    largest NSR among the activations it reads (a graph input counts as noise-free, so the
    first layer is charged its input's rounding): the noise the unit **adds**, from its weights
    and its output rounding. Keeping the unit in float removes about that much noise, so units
    are ranked by it (ties: output SQNR). This is the layer-wise SQNR analysis of quantization
    debuggers (ONNX Runtime's ``qdq_loss_debug``, AIMET's per-layer quantizer analysis), taken as
    a difference so that noise inherited from upstream is not charged twice. One run of each model
    over ``arrays`` replaces one quantized model per unit (``rank_units``); on EfficientNet-Lite0
    (59 units) about 2 s instead of about 100 s.

    Args:
        units: candidates, from :func:`fallback_units`.
        float_model / qdq_model: ``onnx.ModelProto`` (the QDQ model made from the float one).
        arrays: inputs ``{name: (N, ...)}``; ``names``: input names in order; ``batch``: samples per run.

    Returns rows ``{"rank", "node", "op_type", "nodes", "added_nsr", "sqnr_db", "input_sqnr_db"}``,
    most sensitive first (``sqnr_db = 10 log10(1 / NSR)`` of the unit's output).
    """
    graph_inputs = {i.name for i in float_model.graph.input}
    float_tensors = {o for n in float_model.graph.node for o in n.output} | graph_inputs
    producer, consumers = _wiring(qdq_model)
    qnodes = {n.name: n for n in qdq_model.graph.node}

    def dequantized(t: str) -> str:
        """The DequantizeLinear output the next nodes read for float tensor ``t`` (``t`` if none)."""
        for c in consumers.get(t, []):
            if c.op_type == "QuantizeLinear":
                for d in consumers.get(c.output[0], []):
                    if d.op_type == "DequantizeLinear":
                        return d.output[0]
        return t

    plans = []  # (unit, float out, qdq out, [(float in, qdq in)])
    for u in units:
        qn = qnodes.get(u.name)
        if qn is None or not qn.output:
            continue
        q_out = dequantized(qn.output[0])
        # a graph output keeps its name on the DequantizeLinear (the node writes ``<name>_QuantizeLinear_Input``)
        f_out = qn.output[0] if qn.output[0] in float_tensors else q_out if q_out in float_tensors else None
        if f_out is None:
            continue
        ins = []
        for i in qn.input:
            dq = producer.get(i)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in float_tensors:
                continue  # a weight or bias (an initializer), not an activation
            if q.input[0] not in graph_inputs:
                ins.append((q.input[0], i))
        plans.append((u, f_out, q_out, ins))
    f_names = sorted({t for _, fo, _, ins in plans for t in [fo, *(a for a, _ in ins)]})
    q_names = sorted({t for _, _, qo, ins in plans for t in [qo, *(b for _, b in ins)]})
    pairs = sorted({(fo, qo) for _, fo, qo, _ in plans} | {p for *_, ins in plans for p in ins})
    make = _session(session)
    (f_bytes, f_out), (q_bytes, q_out) = exposed(float_model, f_names), exposed(qdq_model, q_names)
    fs = make(f_bytes, threads=threads)
    qs = make(q_bytes, threads=threads)
    noise = dict.fromkeys(pairs, 0.0)
    signal = dict.fromkeys(pairs, 0.0)
    for _, chunk in iter_batches(arrays, names, batch):
        fd = dict(zip(f_out, fs.run(chunk), strict=True))
        qd = dict(zip(q_out, qs.run(chunk), strict=True))
        for fo, qo in pairs:
            f, q = fd[fo].astype(np.float64), qd[qo].astype(np.float64)
            noise[(fo, qo)] += float(np.sum((q - f) ** 2))
            signal[(fo, qo)] += float(np.sum(f**2))

    def nsr(p: tuple[str, str]) -> float:
        return noise[p] / signal[p] if signal[p] > 0 else 0.0

    def db(x: float) -> float:
        return float(10 * np.log10(1 / x)) if x > 0 else float("inf")

    rows = []
    for u, fo, qo, ins in plans:
        out_nsr = nsr((fo, qo))
        in_nsr = max((nsr(p) for p in ins), default=0.0)
        rows.append(
            {
                "node": u.name,
                "op_type": u.op_type,
                "nodes": list(u.nodes),
                "added_nsr": max(0.0, out_nsr - in_nsr),
                "sqnr_db": round(db(out_nsr), 3),
                "input_sqnr_db": round(db(in_nsr), 3),
            }
        )
    rows.sort(key=lambda r: (-r["added_nsr"], r["sqnr_db"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def sensitivity_label(row: dict[str, Any]) -> str:
    """A ranking row's score in words: ``added noise 1.2e-03 (SQNR 24.1 dB)`` or ``cosine loss 2.4e-03``."""
    if "added_nsr" in row:
        return f"added noise {row['added_nsr']:.3g} (output SQNR {row['sqnr_db']:.1f} dB)"
    return f"cosine loss {row['cosine_loss']:.3g}"


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
    "flip_margin",
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

