"""``quantize_dynamic``: dynamic INT8 with ``onnxruntime.quantization.quantize_dynamic``.

Weights are quantized ahead of time (s8, per output channel by default); activations are
quantized at run time, per tensor, from their own range (``DynamicQuantizeLinear``), so no
calibration set is needed. ONNX Runtime's guidance: dynamic INT8 for transformers and RNNs,
static QDQ (:mod:`accelc.passes.quantization`) for CNNs. Op types: ``MatMul`` (with a constant
weight) becomes ``MatMulInteger``/``DynamicQuantizeMatMul``, a fused ``Attention`` becomes
``QAttention``, ``LSTM`` becomes ``DynamicQuantizeLSTM``. ``Gemm`` is not in ONNX Runtime's
dynamic registry: a ``Gemm`` asked for stays float, and the metrics say so.

Outlier channels (``outlier_threshold``, default 3; :mod:`accelc.passes.outlier_decomposition`):
before quantizing, each weight MatMul's activation channels whose absolute maximum on the
calibration set exceeds that many times the median channel's are split off into a small float
MatMul beside the INT8 one (LLM.int8()'s decomposition), so they no longer set the per-tensor
u8 step (``outlier_min_gain`` > 1 splits only where that shrinks the activation's range that
many times: each split adds a Mul, a Gather, a MatMul and an Add). On all-MiniLM-L6-v2 this
took full INT8 from recall@5 0.895 to 0.960 on held-out sentences (README, "Transformers and
recurrent models"); metrics ``outlier_channels`` say how many channels of which
MatMuls, and from how many samples.

Accuracy-aware fallback (``fallback: auto``): when the quantized model misses ``tolerances`` on
the validation set, the quantized nodes are ranked by their local output error (each node's
float input from the float model on a few calibration samples, quantized as ONNX Runtime does at
run time: u8 per tensor with a zero point; its weight as the pass quantizes it), and the worst
ones are kept in float until the tolerances hold or ``max_fp32_nodes`` is reached (counts tried
1, 2, 4, ..., then bisected: :func:`search_count`). Every trial is recorded.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import GraphError, PassError, VerificationError
from accelc.pass_api import Pass, PassContext, PassResult, RecipeView, Slot
from accelc.runners import default_threads
from accelc.tolerances import TOLERANCES_SCHEMA, tolerance_failures

from .loading import iter_batches, load_arrays
from .outlier_decomposition import OUTLIER_MATMUL_SUFFIX, channel_absmax, decompose_outliers, weight_matmuls
from .output_metrics import OUTPUT_KINDS, compare_by_kind, infer_output_kind
from .sensitivity import exposed

#: Op types ``quantize_dynamic`` is asked to quantize by default.
DEFAULT_OP_TYPES = ("MatMul", "Attention", "LSTM")
#: Op types a recipe may name (ONNX Runtime's IntegerOps registry, plus Gemm, which it lacks).
OP_TYPES = ("MatMul", "Attention", "LSTM", "Gemm", "Conv", "Gather", "EmbedLayerNormalization", "Transpose")
#: What each float op type becomes once quantized.
QUANTIZED_FORMS = {
    "MatMul": ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"),
    "Attention": ("QAttention",),
    "LSTM": ("DynamicQuantizeLSTM",),
    "Conv": ("ConvInteger",),
    "Gather": ("Gather",),
    "EmbedLayerNormalization": ("QEmbedLayerNormalization",),
    "Gemm": (),
    "Transpose": (),
}
_FALLBACK_ONLY = ("max_fp32_nodes", "tolerances", "batch_size", "recall_k", "output", "sensitivity_samples")


def quantize_dynamic_model(src: Path, out: Path, options: dict[str, Any], exclude: list[str]) -> Path:
    """``quantize_dynamic`` of ``src`` into ``out`` with the pass options and ``exclude`` kept in float.

    ``extra_options={"DefaultTensorType": FLOAT}`` is always set: after the transformer optimizer
    the fused nodes' outputs carry no type information (its symbolic shape inference does not
    cover them), and ONNX Runtime's quantizer otherwise stops with "Unable to find data type for
    weight_name". Float is the only type such an activation has here.
    Raises :class:`PassError` naming the quantizer's message.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # ORT logs a pre-processing hint through the root logger
    qt = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    try:
        quantize_dynamic(
            str(src),
            str(out),
            op_types_to_quantize=list(options.get("op_types", DEFAULT_OP_TYPES)),
            per_channel=options.get("per_channel", True),
            reduce_range=options.get("reduce_range", False),
            weight_type=qt[options.get("weight_type", "int8")],
            nodes_to_exclude=list(exclude),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )
    except Exception as e:
        raise PassError(f"quantize_dynamic: {type(e).__name__}: {e}") from e
    return out


def quantization_facts(float_model: Any, quantized: Any, op_types: list[str]) -> dict[str, Any]:
    """Counts by op type of what was asked for, what became INT8 and what stayed float (MatMuls
    only with a constant weight: a product of two activations is not quantized dynamically; the
    float outlier-channel MatMuls of :mod:`accelc.passes.outlier_decomposition` are not counted,
    the pass reports them under ``outlier_channels``).

    Returns ``quantized`` (``{int8 op type: count}``), ``float_remaining`` (``{asked op type: count
    still float}``), and ``not_quantized`` (plain sentences, e.g. ``"2 of 2 LSTM nodes stayed
    float"``) for every asked op type with float nodes left.
    """
    def counts(model: Any) -> Counter:
        # a MatMul of two activations (Q.K^T in unfused attention) is not a dynamic-quantization candidate
        inits = {i.name for i in model.graph.initializer}
        return Counter(n.op_type for n in model.graph.node
                       if (n.op_type != "MatMul" or (len(n.input) > 1 and n.input[1] in inits))
                       and not n.name.endswith(OUTLIER_MATMUL_SUFFIX))

    before, after = counts(float_model), counts(quantized)
    int8 = {t: after[t] for forms in QUANTIZED_FORMS.values() for t in forms if after.get(t) and t != "Gather"}
    remaining = {t: after[t] for t in op_types if after.get(t) and before.get(t)}
    notes = [f"{remaining[t]} of {before[t]} {t} node(s) stayed float" for t in remaining]
    if "Gemm" in op_types and before.get("Gemm"):
        notes.append("Gemm is not in ONNX Runtime's dynamic quantization registry")
    return {"quantized": int8, "float_remaining": remaining, "not_quantized": notes}


def _weight_quant(w: np.ndarray, per_channel: bool, weight_type: str) -> np.ndarray:
    """``w`` ``(K, N)`` after the quantizer's weight rounding (symmetric s8, or asymmetric u8)."""
    axis = 0 if per_channel else None
    if weight_type == "int8":
        s = np.abs(w).max(axis=axis, keepdims=True) / 127.0
        s = np.where(s == 0, 1.0, s)
        return np.clip(np.round(w / s), -127, 127) * s
    lo = np.minimum(w.min(axis=axis, keepdims=True), 0)
    hi = np.maximum(w.max(axis=axis, keepdims=True), 0)
    s = np.where(hi - lo == 0, 1.0, (hi - lo) / 255.0)
    zp = np.round(-lo / s)
    return (np.clip(np.round(w / s) + zp, 0, 255) - zp) * s


def _activation_quant(x: np.ndarray) -> np.ndarray:
    """``DynamicQuantizeLinear``: u8 per tensor over the range (widened to contain 0), zero point."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / 255.0 or 1.0
    zp = np.clip(np.round(-lo / s), 0, 255)
    return (np.clip(np.round(x / s) + zp, 0, 255) - zp) * s


def rank_by_local_error(
    model_path: Path,
    arrays: dict[str, np.ndarray],
    names: list[str],
    options: dict[str, Any],
    session: Any = None,
) -> list[dict[str, Any]]:
    """Quantizable ``MatMul``/``Attention`` nodes with a constant 2-D weight, worst first.

    Each node's float activation input is read from the float model on ``arrays`` (one batch),
    quantized as at run time (:func:`_activation_quant`) and multiplied by its quantized weight;
    ``relative_error`` is ``||x̂ Ŵ - x W|| / ||x W||`` (Frobenius). ``session(model bytes)`` opens the
    probe model (an :class:`accelc.runners.Session`; default: ONNX Runtime's CPU session).
    Returns ``[{"node", "op_type", "relative_error"}]``.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {i.name: i for i in model.graph.initializer}
    asked = set(options.get("op_types", DEFAULT_OP_TYPES)) & {"MatMul", "Attention"}
    cands = [
        n for n in model.graph.node
        if n.op_type in asked and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
        and n.name not in options.get("nodes_to_exclude", [])
    ]
    if not cands:
        return []
    probe, out_names = exposed(model, sorted({n.input[0] for n in cands}))
    if session is None:
        from .onnxruntime import ort_trial_session

        sess = ort_trial_session(probe, default_threads())
    else:
        sess = session(probe)
    values = dict(zip(out_names, sess.run({k: arrays[k] for k in names}), strict=True))
    ranking = []
    for n in cands:
        x = values[n.input[0]].astype(np.float64)
        x = x.reshape(-1, x.shape[-1])
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        ref = x @ w
        wq = _weight_quant(w, options.get("per_channel", True), options.get("weight_type", "int8"))
        q = _activation_quant(x) @ wq
        denom = float(np.linalg.norm(ref)) or 1.0
        ranking.append({"node": n.name, "op_type": n.op_type, "relative_error": float(np.linalg.norm(q - ref) / denom)})
    return sorted(ranking, key=lambda r: -r["relative_error"])


def search_count(most: int, passes: Any) -> int | None:
    """The smallest ``k`` in ``1..most`` with ``passes(k)`` true, trying 1, 2, 4, ... (and ``most``),
    then bisecting between the last failing and the first passing count; ``None`` when ``most``
    fails too. Assumes that keeping more nodes in float does not make things worse (each count
    tried is recorded by ``passes``, so a report shows where that did not hold).
    """
    if most < 1:
        return None
    lo, k = 0, 1
    while True:
        k = min(k, most)
        if passes(k):
            break
        if k == most:
            return None
        lo, k = k, k * 2
    hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


class QuantizeDynamic(Pass):
    """Dynamic INT8 (``onnxruntime.quantization.quantize_dynamic``) of a float ONNX model.

    Options: ``op_types`` (default MatMul, Attention, LSTM), ``per_channel`` (default on: one s8
    scale per weight column), ``weight_type`` (int8), ``reduce_range``, ``nodes_to_exclude``.
    Metrics: what was quantized by op type, what asked-for nodes stayed float (``not_quantized``
    names them plainly: an LSTM left float is said so), size. With ``fallback: auto`` the pass
    verifies itself on the validation set against ``tolerances`` (the metrics of
    :mod:`accelc.passes.output_metrics` for the output's kind) and keeps the nodes with the
    largest local error in float until they hold (see the module docstring); ``fallback: off``
    only checks, and its post-check fails naming the worst nodes.
    """

    name = "quantize_dynamic"
    version = "2"
    inputs = (
        Slot("model", ("onnx",)),
        Slot("calibration", ("calibration.data",), optional=True),
        Slot("reference", ("reference.outputs",), optional=True),
        Slot("validation", ("validation.data",), optional=True),
    )
    produces = "onnx.dynamic"
    env_packages = ("onnxruntime", "onnx")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "op_types": {
                "type": "array",
                "items": {"enum": list(OP_TYPES)},
                "uniqueItems": True,
                "minItems": 1,
                "default": list(DEFAULT_OP_TYPES),
            },
            "per_channel": {"type": "boolean", "default": True},
            "weight_type": {"enum": ["int8", "uint8"], "default": "int8"},
            "reduce_range": {"type": "boolean", "default": False},
            "nodes_to_exclude": {"type": "array", "items": {"type": "string"}, "default": []},
            "fallback": {
                "enum": ["off", "auto"],
                "description": "Check the tolerances here; 'auto' keeps the worst nodes in float until they hold.",
            },
            "max_fp32_nodes": {"type": "integer", "minimum": 0, "default": 8},
            "tolerances": TOLERANCES_SCHEMA,
            "output": {
                "enum": ["auto", *OUTPUT_KINDS],
                "description": "How the fallback compares outputs. Unset: the recipe's verify.output, else auto.",
            },
            "recall_k": {
                "type": "integer",
                "minimum": 1,
                "description": "k of neighbour recall@k. Unset: the recipe's verify.recall_k, else 5.",
            },
            "batch_size": {"type": "integer", "minimum": 1, "default": 16},
            "sensitivity_samples": {"type": "integer", "minimum": 1, "default": 16},
            "outlier_threshold": {
                "type": ["number", "null"],
                "exclusiveMinimum": 1,
                "default": 3,
                "description": "Keep a MatMul input's outlier channels (absolute maximum over the calibration set "
                "above this many times the median channel's) in a small float MatMul beside the INT8 one "
                "(LLM.int8()'s decomposition). null: off. Needs data.calibration.",
            },
            "outlier_min_gain": {
                "type": "number",
                "minimum": 1,
                "default": 1,
                "description": "Split a MatMul's outliers only when that shrinks its activation's range at least "
                "this many times (each split adds four small ops). 1: wherever there are outliers.",
            },
            "outlier_max_channels": {
                "type": "integer",
                "minimum": 1,
                "default": 32,
                "description": "At most this many outlier channels per MatMul (the largest).",
            },
        },
    }

    def configure(self, options: dict[str, Any], recipe: RecipeView, where: str) -> dict[str, Any]:
        """With ``fallback`` set: the tolerances of this stage (those of the first verified stage from
        here on) unless the step sets its own, the verify batch size, and the recipe's ``verify.output``
        and ``verify.recall_k``, so the fallback search judges the outputs as ``verify`` will.
        Without ``fallback`` the options are left as they are (verify alone checks the stage).

        Raises:
            GraphError: ``fallback`` is set, the step sets no ``tolerances`` and no stage from here
                on is verified.
        """
        if not options.get("fallback"):
            return options
        opts = {k: recipe.verify[k] for k in ("output", "recall_k") if k in recipe.verify}
        opts.update(options)
        tol = recipe.stage_tolerances(self.name)
        if tol:
            opts.setdefault("tolerances", tol)
            opts.setdefault("batch_size", recipe.verify_batch_size)
        elif not opts.get("tolerances"):
            raise GraphError(
                f"{where}: quantize_dynamic.fallback '{opts['fallback']}' needs tolerances, but the step sets none "
                "and its stage is not verified (set quantize_dynamic.tolerances, or verify.tolerances with "
                "'quantize_dynamic' in verify.after)"
            )
        return opts

    def uses_inputs(self, options: dict[str, Any]) -> set[str]:
        """The validation set and reference outputs (and calibration samples) with ``fallback`` set;
        the calibration samples with ``outlier_threshold`` set."""
        used = {"calibration", "reference", "validation"} if options.get("fallback") else set()
        return used | ({"calibration"} if options.get("outlier_threshold") else set())

    def key_material(self, options: dict[str, Any], host: Any, sources: Any) -> dict[str, Any]:
        material = super().key_material(options, host, sources)
        if not options.get("fallback"):
            material["options"] = {k: v for k, v in material["options"].items() if k not in _FALLBACK_ONLY}
        return material

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import onnx

        src = inputs["model"].file
        float_model = onnx.load(str(src))
        names = {n.name for n in float_model.graph.node}
        unknown = [n for n in options["nodes_to_exclude"] if n not in names]
        if unknown:
            raise PassError(f"quantize_dynamic.nodes_to_exclude: no node named {', '.join(unknown)} in the graph")
        out = ctx.workdir / "model.onnx"
        exclude = list(options["nodes_to_exclude"])
        metrics: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="accelc-dynq-", dir=ctx.scratch) as tmp:
            src, outliers = self._decompose(ctx, inputs, options, src, float_model, Path(tmp))
            metrics["outlier_channels"] = outliers
            # the decomposition's float MatMuls stay float in every trial
            opts = {**options, "nodes_to_exclude": exclude + outliers.get("float_matmuls", [])}
            if options.get("fallback"):
                ctx.progress("quantize and verify")
                metrics.update(self._fallback(ctx, inputs, opts, src, out))
                exclude = exclude + metrics["fp32_nodes"]
            else:
                ctx.progress("quantize")
                quantize_dynamic_model(src, out, opts, opts["nodes_to_exclude"])
        q = onnx.load(str(out))
        metrics.update(quantization_facts(float_model, q, list(options["op_types"])))
        metrics.update(excluded_nodes=len(exclude), size_mib=round(out.stat().st_size / 2**20, 3),
                       per_channel=options["per_channel"])
        return PassResult("model.onnx", metrics=metrics, meta=inputs["model"].meta)

    def _decompose(
        self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any], src: Path,
        float_model: Any, tmp: Path,
    ) -> tuple[Path, dict[str, Any]]:
        """``(model to quantize, outlier_channels metrics)``: ``src`` with each weight MatMul's
        outlier channels split off (:mod:`accelc.passes.outlier_decomposition`), statistics from
        the calibration set; ``src`` itself when ``outlier_threshold`` is null, no calibration set
        is wired, or no channel qualifies (the metrics say which)."""
        import onnx

        threshold = options.get("outlier_threshold")
        if not threshold or "MatMul" not in options["op_types"]:
            return src, {"decomposed": 0, "reason": "off"}
        if "calibration" not in inputs:
            return src, {"decomposed": 0, "reason": "no calibration data (add data.calibration)"}
        names = ctx.signature.names
        data = load_arrays(inputs["calibration"])
        batch = min(options["batch_size"], ctx.signature.max_batch())
        nodes = weight_matmuls(float_model, set(options["nodes_to_exclude"]))
        if not nodes:
            return src, {"decomposed": 0, "reason": "no MatMul with a constant weight"}
        ctx.progress("outlier channels: activation statistics on the calibration set")
        absmax = channel_absmax(
            src,
            [feeds for _, feeds in iter_batches(data, names, batch)],
            sorted({n.input[0] for n in nodes}),
            lambda model: ctx.runners.session(model, default_threads()),
        )
        model, records = decompose_outliers(
            float_model, absmax, threshold, options["outlier_max_channels"], set(options["nodes_to_exclude"]),
            min_gain=options["outlier_min_gain"],
        )
        info: dict[str, Any] = {
            "threshold": threshold,
            "min_gain": options["outlier_min_gain"],
            "samples": len(data[names[0]]),
            "decomposed": len(records),
            "of": len(nodes),
            "channels": sum(r["channels"] for r in records),
            "nodes": records,
        }
        if not records:
            return src, {**info, "reason": "no channel above the threshold"}
        path = tmp / "decomposed.onnx"
        onnx.save(model, str(path))
        info["float_matmuls"] = [f"{r['node']}{OUTLIER_MATMUL_SUFFIX}" for r in records]
        return path, info

    def _fallback(
        self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any], src: Path, out: Path
    ) -> dict[str, Any]:
        for slot in ("reference", "validation"):
            if slot not in inputs:
                raise PassError(f"quantize_dynamic.fallback needs the '{slot}' input (add data.validation)")
        names = ctx.signature.names
        data = load_arrays(inputs["validation"])
        ref = load_arrays(inputs["reference"])["output0"]
        declared = None if options.get("output", "auto") == "auto" else options["output"]
        kind = infer_output_kind(ref, declared or inputs["reference"].meta.get("output_kind"), data.get("labels"))
        tolerances = options.get("tolerances") or {}
        batch = min(options["batch_size"], ctx.signature.max_batch())

        threads = default_threads()

        def session(path: Path) -> Any:
            # trials on ONNX Runtime: a dynamic INT8 graph holds com.microsoft operators
            return ctx.runners.session(path, threads)

        def evaluate(path: Path) -> dict[str, Any]:
            sess = session(path)
            outs = [sess.run(feeds)[0] for _, feeds in iter_batches(data, names, batch)]
            m = compare_by_kind(ref, np.concatenate(outs), kind, labels=data.get("labels"),
                                mask=data.get("attention_mask"), k=options.get("recall_k", 5))
            fails = tolerance_failures(m, tolerances)
            keep = ("cosine", "cosine_min", "neighbor_recall", "top1_agreement", "max_abs_error")
            return {**{k: m[k] for k in keep if k in m}, "passed": not fails, "failures": fails}

        trials: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="accelc-dynq-trials-") as tmp:
            first = quantize_dynamic_model(src, Path(tmp) / "t0.onnx", options, options["nodes_to_exclude"])
            trials.append({"trial": 0, "fp32_nodes": [], **evaluate(first)})
            files = {0: first}
            ranking: list[dict[str, Any]] = []
            if not trials[0]["passed"]:
                probe_src = load_arrays(inputs["calibration"]) if "calibration" in inputs else data
                n = len(probe_src[names[0]])
                pick = np.unique(np.linspace(0, n - 1, min(options["sensitivity_samples"], n)).round().astype(int))
                ctx.progress("rank nodes by local INT8 error")
                ranking = rank_by_local_error(src, {k: probe_src[k][pick] for k in names}, names, options, session)
                if options["fallback"] == "auto":

                    def trial(k: int) -> bool:
                        fp32 = [r["node"] for r in ranking[:k]]
                        ctx.progress(f"fallback trial: {k} node(s) in float")
                        path = quantize_dynamic_model(
                            src, Path(tmp) / f"t{k}.onnx", options, options["nodes_to_exclude"] + fp32
                        )
                        files[k] = path
                        trials.append({"trial": k, "fp32_nodes": fp32, **evaluate(path)})
                        return trials[-1]["passed"]

                    search_count(min(options["max_fp32_nodes"], len(ranking)), trial)
            kept = min((t for t in trials if t["passed"]), key=lambda t: t["trial"], default=None)
            chosen = kept or max(trials, key=lambda t: (t.get("neighbor_recall", 0), t.get("cosine", 0)))
            chosen["kept"] = kept is not None
            shutil.copyfile(files[chosen["trial"]], out)
        metrics: dict[str, Any] = {
            "kept": "none (tolerances missed)" if kept is None else (
                "full INT8" if not kept["fp32_nodes"] else f"{len(kept['fp32_nodes'])} node(s) in float"),
            "fp32_nodes": chosen["fp32_nodes"],
            "tolerances": tolerances,
            "output_kind": kind,
            "trials": trials,
            "local_error_ranking": ranking[:16],
        }
        if kept is None:
            metrics["tolerance_failures"] = chosen["failures"]
        return metrics

    def check(self, result_metrics: dict[str, Any], options: dict[str, Any]) -> None:
        """Fail when ``fallback`` found no trial meeting the tolerances, naming the worst nodes."""
        failures = result_metrics.get("tolerance_failures")
        if not failures:
            return
        top = ", ".join(f"{r['node']} ({r['op_type']}, local error {r['relative_error']:.3g})"
                        for r in result_metrics.get("local_error_ranking", [])[:5])
        hint = ("set quantize_dynamic: {fallback: auto, max_fp32_nodes: N}" if options.get("fallback") != "auto"
                else f"raise quantize_dynamic.max_fp32_nodes (now {options.get('max_fp32_nodes')})")
        raise VerificationError(f"dynamic INT8 misses the tolerances: {'; '.join(failures)}. Worst nodes: "
                                f"{top or 'none'}; {hint}, or relax the tolerances")
