"""Static INT8 post-training quantization with ``onnxruntime.quantization``, as two passes.

``calibrate`` runs an ONNX Runtime calibrator (min-max, entropy or percentile) over
the calibration set and stores the per-tensor ranges (ORT's ``TensorsData`` JSON,
written by ``save_tensors_data``) as a ``calibration.table`` artifact. ``quantize``
inserts QuantizeLinear/DequantizeLinear pairs from that table
(``quantize_static(..., calibration_cache_path=...)``), so changing a quantize option
never recalibrates.

Accuracy-aware INT8 (see :mod:`accelc.passes.sensitivity` for the method):

* ``calibrate`` with ``method: auto`` computes a table per candidate method, quantizes the
  model with each (using the downstream ``quantize`` step's format options, which lowering
  copies into ``selection``), verifies every trial on the validation set and keeps the best.
* ``quantize`` with ``fallback`` set verifies its own output against the quantize stage's
  tolerances (lowering copies them into ``tolerances``). When they are missed it ranks the
  quantized nodes by sensitivity; with ``fallback: auto`` it then keeps the most sensitive
  ones in float until the tolerances hold (at most ``max_fp32_nodes``), and with
  ``fallback: off`` (no permission) its post-check fails the build naming the most
  sensitive nodes and the option to set. Without ``fallback`` it quantizes only, and the
  ``verify`` stage after it checks the tolerances (so changing one reruns nothing).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import PassError, VerificationError
from accelc.pass_api import Pass, PassContext, PassResult, Slot
from accelc.runners import ONNX_RUNTIMES, default_threads

from .bias_correction import correct_bias, recorded_correction
from .loading import iter_batches, load_arrays
from .sensitivity import (
    FOLDABLE_ACTIVATIONS,
    Evaluator,
    fallback_units,
    p50_latency_ms,
    quality_key,
    rank_units,
    search_fallback,
)
from .verification import TOLERANCES, tolerance_failures

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

#: Histogram bins for ``entropy`` when ``num_bins`` is not set. ORT's own default (128) equals
#: its 128 quantized bins, which leaves the KL search a single candidate: the full min-max range.
ENTROPY_DEFAULT_BINS = 512

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

#: Quantize options that fix the quantized format (what ``calibrate`` needs to score a table).
FORMAT_OPTIONS: dict[str, Any] = {
    "per_channel": {"type": "boolean", "default": True, "description": "One weight scale per output channel."},
    "activation_type": {
        "enum": ["uint8", "int8"],
        "default": "uint8",
        "description": "Activation integer type: uint8 for x86 VNNI, int8 (with activation_symmetric) for TensorRT.",
    },
    "weight_type": {"enum": ["int8", "uint8"], "default": "int8", "description": "Weight integer type."},
    "reduce_range": {
        "type": "boolean",
        "default": False,
        "description": "7-bit weights, for CPUs without VNNI whose u8s8 kernels can overflow.",
    },
    "activation_symmetric": {"type": "boolean", "default": False, "description": "Zero point 0 for activations."},
    "weight_symmetric": {"type": "boolean", "default": True, "description": "Zero point 0 for weights."},
    "nodes_to_exclude": {
        "type": "array",
        "items": {"type": "string"},
        "default": [],
        "description": "ONNX node names kept in float.",
    },
    "op_types_to_quantize": {
        "type": "array",
        "items": {"type": "string"},
        "description": "Only these ONNX op types are quantized (default: every type ONNX Runtime can quantize).",
    },
    "bias_correction": {
        "type": "boolean",
        "default": True,
        "description": "Correct each quantized layer's bias so its per-channel output mean matches the float "
        "model's on the calibration set (empirical bias correction, Nagel et al. 2019; see "
        "accelc.passes.bias_correction). Free at inference time.",
    },
    "float_node_inputs": {
        "enum": ["qdq", "float"],
        "description": "How a node kept in float reads an activation a quantized node wrote. 'qdq' (ONNX "
        "Runtime's layout) keeps the QuantizeLinear/DequantizeLinear pair there: ORT needs the Q to fuse the "
        "producer into one INT8 op. 'float' removes the pair, so the producer writes float32 directly: "
        "OpenVINO runs it as an INT8 kernel with a float output and skips a u8 round trip that it executes "
        "unfused. Unset: 'float' for runtime openvino, else 'qdq' (set by lowering).",
    },
}

# No defaults here: lowering fills these in only where the recipe left them unset.
#: Calibrate options read only by ``method: auto``; quantize options read only with ``fallback`` set.
#: They stay out of the cache key otherwise, so setting them on a plain pass reruns nothing.
_AUTO_ONLY = ("candidates", "selection")
_FALLBACK_ONLY = (
    "max_fp32_nodes", "search", "sensitivity_samples", "tolerances", "batch_size", "latency_iterations", "runtime"
)

#: The option that names what runs the trials of ``calibrate: auto`` and ``quantize: fallback``.
_RUNTIME_SCHEMA = {
    "enum": list(ONNX_RUNTIMES),
    "description": "Runtime that runs every trial (verification and latency). Unset: lowering sets the recipe's "
    "runtime (ONNX Runtime for runtimes that do not read ONNX), since ONNX Runtime and OpenVINO execute the "
    "same QDQ graph with different INT8 rounding.",
}

_TOLERANCES_SCHEMA = {
    "type": "object",
    "propertyNames": {"enum": list(TOLERANCES)},
    "additionalProperties": {"type": "number"},
}


class _Reader:
    """ORT ``CalibrationDataReader`` over in-memory arrays, one batch per ``get_next``."""

    def __init__(self, arrays: dict[str, Any], names: list[str], batch: int):
        self._batches = [feeds for _, feeds in iter_batches(arrays, names, batch)]
        self._i = 0

    def get_next(self) -> dict[str, Any] | None:
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return self._batches[self._i - 1]

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = self._batches[start_index:end_index]
        self._i = 0


def pin_float_nodes(model: Any) -> list[str]:
    """Keep the Conv/ConvTranspose/Gemm nodes the quantizer left in float in float at run time.

    ONNX Runtime's ``WeightBiasQuantization`` graph transformer (level ``ORT_ENABLE_BASIC`` and
    up) quantizes a float Conv/ConvTranspose/Gemm whose activation input comes from a
    ``DequantizeLinear`` with a per-tensor scale: per-tensor symmetric INT8 weights and an
    INT32 bias, regardless of ``nodes_to_exclude``. On a depthwise convolution with folded
    BatchNorm that is far worse than not excluding the node at all. The transformer only
    matches a scalar-scale ``DequantizeLinear`` producer, so each such node gets its own
    per-axis (axis 1) ``DequantizeLinear`` with the same scale and zero point repeated per
    channel: numerically identical, left alone by the transformer, and the shared one still
    feeds the quantized consumers.

    Edits ``model`` (an ``onnx.ModelProto``) in place; returns the names of the pinned nodes.
    """
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # per-axis DequantizeLinear needs opset 13
        return []
    g = model.graph
    init = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    pinned: list[tuple[Any, Any]] = []
    for n in g.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 2 or n.input[1] not in init:
            continue
        dq = producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in init or init[dq.input[1]].dims:
            continue
        has_zp = len(dq.input) > 2 and bool(dq.input[2])
        if has_zp and dq.input[2] not in init:
            continue
        w = init[n.input[1]].dims
        attrs = {a.name: a.i for a in n.attribute}
        if n.op_type == "Conv":  # weight (C_out, C_in / group, ...)
            channels = w[1] * attrs.get("group", 1)
        elif n.op_type == "ConvTranspose":  # weight (C_in, C_out / group, ...)
            channels = w[0]
        else:  # Gemm: input (M, K), weight (K, N), or (N, K) with transB
            if attrs.get("transA", 0):
                continue
            channels = w[1] if attrs.get("transB", 0) else w[0]
        base = f"{n.name or n.output[0]}_float_input"
        scale = numpy_helper.to_array(init[dq.input[1]])
        g.initializer.append(numpy_helper.from_array(np.full(channels, scale, scale.dtype), f"{base}_scale"))
        dq_inputs = [dq.input[0], f"{base}_scale"]
        if has_zp:
            zp = numpy_helper.to_array(init[dq.input[2]])
            g.initializer.append(numpy_helper.from_array(np.full(channels, zp, zp.dtype), f"{base}_zero_point"))
            dq_inputs.append(f"{base}_zero_point")
        node = helper.make_node("DequantizeLinear", dq_inputs, [base], name=f"{base}_DequantizeLinear", axis=1)
        n.input[0] = base
        pinned.append((n, node))
    for n, node in pinned:
        g.node.insert(list(g.node).index(n), node)
    prune_dead_nodes(model)  # a shared DequantizeLinear whose every consumer was pinned
    return [n.name for n, _ in pinned]


def unquantize_float_inputs(model: Any, float_model: Any, float_nodes: set[str]) -> list[str]:
    """Remove the QuantizeLinear/DequantizeLinear pairs in front of float nodes.

    Every ``DequantizeLinear`` of an activation (its input written by a ``QuantizeLinear``) whose
    consumers are all float nodes (named in ``float_nodes``; a graph output is not one) is
    bypassed: the consumers read the ``QuantizeLinear``'s float input instead. The pair is then
    dropped by :func:`prune_dead_nodes` unless other (quantized) consumers still read the Q.

    ONNX Runtime's quantizer drops a ``Relu``/``Clip`` whose range the following Q already
    clamps to, and names the producer's output after the activation's. Where the bypassed
    tensor was written by such an activation in ``float_model`` (the model before
    quantization), a copy of it (attributes and bound initializers included) is put back in
    front of the float consumers, so they read exactly the float graph's tensor. A tensor
    whose float-graph producer is missing for any other reason is left quantized.

    Numerically the float nodes then see the producer's unrounded output: one quantization
    error fewer. Edits ``model`` in place; returns the names of the rewired consumers.
    """
    import onnx

    g = model.graph
    float_producer = {o: n for n in float_model.graph.node for o in n.output}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    in_qdq = {n.name for n in g.node}
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    rewired: list[str] = []
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        users = consumers.get(dq.output[0], [])
        if q is None or q.op_type != "QuantizeLinear" or not users or dq.output[0] in outputs:
            continue
        if not all(u.name in float_nodes for u in users):
            continue
        source = q.input[0]
        fp = float_producer.get(source)
        if fp is None or (fp.name not in in_qdq and fp.op_type not in FOLDABLE_ACTIVATIONS):
            continue
        if fp.name not in in_qdq:  # a folded activation: run it in float again
            act = onnx.NodeProto()
            act.CopyFrom(fp)
            act.name = f"{fp.name}_float"
            act.input[0] = source
            act.output[0] = f"{source}_float"
            for extra in list(act.input)[1:]:
                if extra and extra not in inits and extra in float_inits:
                    g.initializer.append(float_inits[extra])
                    inits.add(extra)
            g.node.insert(list(g.node).index(dq), act)
            in_qdq.add(act.name)
            source = act.output[0]
        for u in users:
            for k, name in enumerate(u.input):
                if name == dq.output[0]:
                    u.input[k] = source
            rewired.append(u.name)
    if rewired:
        prune_dead_nodes(model)
    return rewired


def prune_dead_nodes(model: Any) -> int:
    """Remove nodes none of whose outputs is consumed or a graph output (repeatedly, so chains
    such as QuantizeLinear -> DequantizeLinear go together), then unused initializers.
    ONNX Runtime would otherwise still execute them. Edits ``model`` in place; returns the count."""
    g = model.graph
    removed = 0
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return removed


def quantized_op_types(options: dict[str, Any]) -> frozenset[str]:
    """Op types ``quantize_static`` quantizes: ``op_types_to_quantize``, else (as ORT does when it is
    unset) every op type of its QDQ and QLinear registries."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    chosen = options.get("op_types_to_quantize")
    return frozenset(chosen) if chosen else frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)


def quantize_model(
    model: Path,
    table: Path,
    out: Path,
    options: dict[str, Any],
    nodes_to_exclude: list[str] | None = None,
    nodes_to_quantize: list[str] | None = None,
    calibration: dict[str, np.ndarray] | None = None,
) -> Path:
    """QDQ-quantize ``model`` with the ranges in ``table`` (ORT ``TensorsData`` JSON) into ``out``.

    ``options`` holds the format options (:data:`FORMAT_OPTIONS`; defaults for missing ones);
    ``nodes_to_exclude`` replaces ``options["nodes_to_exclude"]`` when given;
    ``nodes_to_quantize`` restricts quantization to those nodes (``None``: all eligible).
    With ``float_node_inputs: float`` the Q/DQ pairs in front of float nodes are removed
    (:func:`unquantize_float_inputs`). Excluded Conv/Gemm nodes still fed by a
    ``DequantizeLinear`` are pinned to float (:func:`pin_float_nodes`). With
    ``bias_correction`` (the default) the quantized layers' biases are then corrected on
    ``calibration`` (model inputs by name, ``(N, ...)`` float32) by
    :func:`accelc.passes.bias_correction.correct_bias`, which records what it did in the
    model's ``metadata_props`` (:func:`accelc.passes.bias_correction.recorded_correction`).

    Raises:
        PassError: ``quantize_static`` or the bias correction failed, or ``bias_correction``
            is on and no ``calibration`` samples were given.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    opts = {k: spec.get("default") for k, spec in FORMAT_OPTIONS.items()}
    opts.update({k: v for k, v in options.items() if k in FORMAT_OPTIONS})
    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    exclude = list(opts["nodes_to_exclude"] if nodes_to_exclude is None else nodes_to_exclude)
    logging.getLogger().setLevel(logging.ERROR)  # ORT logs a pre-processing hint through the root logger
    try:
        quantize_static(
            str(model),
            str(out),
            calibration_data_reader=None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=opts.get("op_types_to_quantize"),
            per_channel=opts["per_channel"],
            reduce_range=opts["reduce_range"],
            activation_type=qt[opts["activation_type"]],
            weight_type=qt[opts["weight_type"]],
            nodes_to_exclude=exclude,
            nodes_to_quantize=nodes_to_quantize,
            calibrate_method=load_tensors_data(table).calibration_method,
            calibration_cache_path=str(table),
            extra_options={
                "ActivationSymmetric": opts["activation_symmetric"],
                "WeightSymmetric": opts["weight_symmetric"],
            },
        )
    except Exception as e:
        raise PassError(f"quantize: {type(e).__name__}: {e}") from e
    q = onnx.load(str(out))
    changed = False
    if opts.get("float_node_inputs") == "float":
        # Only the excluded nodes count as float. In a sensitivity model (``nodes_to_quantize``:
        # one node) its consumers are float only because the probe leaves them out; in the built
        # model they read its INT8 output, so the Q/DQ pair on that output stays and its
        # rounding is part of the node's measured sensitivity.
        changed = bool(unquantize_float_inputs(q, onnx.load(str(model)), set(exclude)))
    if pin_float_nodes(q) or changed:
        onnx.save(q, str(out))
    if opts["bias_correction"]:
        if calibration is None:
            raise PassError("quantize.bias_correction needs the calibration samples (add data.calibration)")
        try:
            correct_bias(model, out, calibration, threads=default_threads())
        except Exception as e:
            raise PassError(f"quantize: bias correction: {type(e).__name__}: {e}") from e
    return out


def _trial_record(metrics: dict[str, Any], tolerances: dict[str, float]) -> dict[str, Any]:
    failures = tolerance_failures(metrics, tolerances)
    rec = {k: metrics[k] for k in _TRIAL_METRICS if k in metrics}
    rec.update(passed=not failures, failures=failures)
    return rec


def _validation_evaluator(
    inputs: dict[str, Artifact], ctx: PassContext, batch: int, runtime: str = "onnxruntime"
) -> Evaluator:
    data = load_arrays(inputs["validation"])
    ref = load_arrays(inputs["reference"])["output0"]
    batch = min(batch, ctx.signature.max_batch())
    return Evaluator(data, ctx.signature.names, ref, batch, default_threads(), data.get("labels"), runtime)


def _latency_feeds(evaluator: Evaluator) -> dict[str, np.ndarray]:
    return {k: v[:1] for k, v in evaluator.arrays.items()}


class Calibrate(Pass):
    """Collect activation ranges over the calibration set with an ONNX Runtime calibrator.

    Methods (``onnxruntime.quantization.calibrate``): ``minmax`` (running min/max),
    ``entropy`` (KL-divergence threshold, TensorRT's classic method; 512 histogram bins
    unless ``num_bins`` is set), ``percentile`` (the given percentile of the absolute-value
    histogram, 99.999 by default). ``symmetric`` makes ranges symmetric around 0 (needed for
    symmetric INT8 activations, e.g. TensorRT).

    ``auto`` tries every method in ``candidates``: each table is used to quantize the model
    (with ``selection.quantize``, the downstream quantize step's format options) and the
    quantized model is verified on the validation set against the source model's outputs.
    The table of the trial that scores best (:func:`accelc.passes.sensitivity.quality_key`
    under ``selection.tolerances``) becomes ``calibration.json``; every table is kept under
    ``tables/``. Metrics: ``trials`` (method, verification metrics, p50 latency at batch 1)
    and ``kept``. ``selection.runtime`` is what runs the trials (lowering sets the recipe's).
    """

    name = "calibrate"
    version = "3"
    inputs = (
        Slot("model", ("onnx",)),
        Slot("data", ("calibration.data",)),
        Slot("reference", ("reference.outputs",), optional=True),
        Slot("validation", ("validation.data",), optional=True),
    )
    produces = "calibration.table"
    final = False
    env_packages = ("onnxruntime", "onnx")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "method": {
                "enum": [*METHODS, "auto"],
                "default": "minmax",
                "description": "Range estimator; 'auto' tries each of candidates and keeps the best verified.",
            },
            "candidates": {
                "type": "array",
                "items": {"enum": list(METHODS)},
                "minItems": 1,
                "uniqueItems": True,
                "default": list(METHODS),
                "description": "Methods tried by 'auto'.",
            },
            "percentile": {
                "type": "number",
                "exclusiveMinimum": 90,
                "maximum": 100,
                "default": 99.999,
                "description": "Percentile of |x| taken as the range (method percentile).",
            },
            "num_bins": {
                "type": "integer",
                "minimum": 128,
                "maximum": 65536,
                "description": "Histogram bins (entropy, percentile); entropy defaults to 512.",
            },
            "symmetric": {"type": "boolean", "default": False, "description": "Ranges symmetric around 0."},
            "moving_average": {
                "type": "boolean",
                "default": False,
                "description": "Exponential moving average of per-batch min/max (method minmax).",
            },
            "batch_size": {
                "type": "integer",
                "minimum": 1,
                "default": 1,
                "description": "Samples per calibration batch (must fit the model's batch dimension).",
            },
            "selection": {
                "type": "object",
                "additionalProperties": False,
                "description": "How 'auto' scores a table; set by lowering from the quantize step and verify.",
                "properties": {
                    "quantize": {"type": "object", "additionalProperties": False, "properties": FORMAT_OPTIONS},
                    "tolerances": _TOLERANCES_SCHEMA,
                    "batch_size": {"type": "integer", "minimum": 1},
                    "latency_iterations": {"type": "integer", "minimum": 1, "default": 20},
                    "runtime": _RUNTIME_SCHEMA,
                },
            },
        },
    }

    def uses_inputs(self, options: dict[str, Any]) -> set[str]:
        """Optional slots this invocation needs: the validation set and reference outputs for ``auto``."""
        return {"reference", "validation"} if options.get("method") == "auto" else set()

    def key_material(self, options: dict[str, Any], host: Any, sources: Any) -> dict[str, Any]:
        """Options minus those only ``auto`` reads, when the method is fixed."""
        material = super().key_material(options, host, sources)
        if options.get("method") != "auto":
            material["options"] = {k: v for k, v in material["options"].items() if k not in _AUTO_ONLY}
        return material

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        data = load_arrays(inputs["data"])
        n = len(data[ctx.signature.names[0]])
        if options["method"] != "auto":
            ranges = self._collect(ctx, inputs["model"].file, data, options["method"], options)
            from onnxruntime.quantization.calibrate import save_tensors_data

            save_tensors_data(ranges, ctx.workdir / "calibration.json")
            return PassResult(
                "calibration.json", metrics={"method": options["method"], "samples": n, "tensors": len(ranges.data)}
            )
        return self._auto(ctx, inputs, data, options)

    def _collect(
        self, ctx: PassContext, model: Path, data: dict[str, np.ndarray], method: str, options: dict[str, Any]
    ) -> Any:
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

        extra: dict[str, Any] = {"symmetric": options["symmetric"]}
        if method == "minmax":
            extra["moving_average"] = options["moving_average"]
        if method == "percentile":
            extra["percentile"] = options["percentile"]
        if options.get("num_bins"):
            extra["num_bins"] = options["num_bins"]
        elif method == "entropy":
            extra["num_bins"] = ENTROPY_DEFAULT_BINS
        batch = min(options["batch_size"], ctx.signature.max_batch())
        logging.getLogger("onnxruntime").setLevel(logging.ERROR)
        ctx.progress(f"calibrating ({method})")
        with tempfile.TemporaryDirectory(prefix="accelc-calib-", dir=ctx.scratch) as tmp:
            try:
                cal = create_calibrator(
                    Path(model),
                    None,
                    augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=CalibrationMethod[METHODS[method]],
                    extra_options=extra,
                )
                # the histogram calibrators print progress to stdout, which would tear the progress display
                with contextlib.redirect_stdout(io.StringIO()):
                    cal.collect_data(_Reader(data, ctx.signature.names, batch))
                    return cal.compute_data()
            except Exception as e:
                raise PassError(f"calibrate ({method}): {type(e).__name__}: {e}") from e

    def _auto(
        self, ctx: PassContext, inputs: dict[str, Artifact], data: dict[str, np.ndarray], options: dict[str, Any]
    ) -> PassResult:
        from onnxruntime.quantization.calibrate import save_tensors_data

        for slot in ("reference", "validation"):
            if slot not in inputs:
                raise PassError(f"calibrate method 'auto' needs the '{slot}' input (add data.validation to the recipe)")
        sel = options.get("selection", {})
        tolerances = sel.get("tolerances", {})
        runtime = sel.get("runtime", "onnxruntime")
        evaluator = _validation_evaluator(inputs, ctx, sel.get("batch_size", 16), runtime)
        tables = ctx.workdir / "tables"
        tables.mkdir()
        trials: list[dict[str, Any]] = []
        tensors = 0
        with tempfile.TemporaryDirectory(prefix="accelc-calib-trials-", dir=ctx.scratch) as tmp:
            models: dict[str, str | Path] = {"fp32": inputs["model"].file}
            for method in options["candidates"]:
                ranges = self._collect(ctx, inputs["model"].file, data, method, options)
                tensors = len(ranges.data)
                table = tables / f"{method}.json"
                save_tensors_data(ranges, table)
                ctx.progress(f"trial {method}: quantize and verify")
                q = quantize_model(
                    inputs["model"].file, table, Path(tmp) / f"{method}.onnx", sel.get("quantize", {}), calibration=data
                )
                rec = {"method": method, **({"percentile": options["percentile"]} if method == "percentile" else {})}
                rec.update(_trial_record(evaluator.metrics(q), tolerances))
                trials.append(rec)
                models[method] = q
            ctx.progress("latency of the trials, side by side")
            lat = p50_latency_ms(
                models, _latency_feeds(evaluator), default_threads(), sel.get("latency_iterations", 20),
                runtime=runtime,
            )
        for rec in trials:
            rec["p50_ms"] = lat[rec["method"]]
        # max() keeps the first of equal keys: candidates are tried in the order given
        best = max(trials, key=lambda r: quality_key(r, tolerances))
        for rec in trials:
            rec["kept"] = rec is best
        shutil.copyfile(tables / f"{best['method']}.json", ctx.workdir / "calibration.json")
        return PassResult(
            "calibration.json",
            metrics={
                "method": best["method"],
                "runtime": runtime,
                "samples": len(data[ctx.signature.names[0]]),
                "tensors": tensors,
                "latency": {
                    "batch": 1,
                    "threads": default_threads(),
                    "fp32_ms": lat["fp32"],
                    "kept_ms": lat[best["method"]],
                },
                "trials": trials,
            },
        )


class Quantize(Pass):
    """Insert QDQ pairs (static INT8) from a calibration table with ``onnxruntime.quantization.quantize_static``.

    Defaults follow ORT's guidance for x86 CPUs with VNNI: u8 activations, s8 weights,
    per-channel weights, no reduce_range. For TensorRT use s8 activations with
    symmetric ranges (``activation_type: int8``, ``activation_symmetric: true``).
    ``nodes_to_exclude`` keeps the named nodes in float (pinned against ORT's
    load-time re-quantization, see :func:`pin_float_nodes`). ``bias_correction`` (on by
    default) then corrects the quantized layers' INT32 biases on the calibration samples
    (:mod:`accelc.passes.bias_correction`); every trial below is corrected the same way, and
    the metrics report it under ``bias_correction``.

    With ``fallback`` set (``off`` or ``auto``) lowering copies the quantize stage's verify
    tolerances into ``tolerances`` and the pass verifies its output on the validation set
    (the numbers ``verify`` reports for the same model). If the tolerances are missed it
    ranks the quantized nodes by sensitivity (one node quantized at a time against the
    float graph, on ``sensitivity_samples`` calibration samples; see
    :mod:`accelc.passes.sensitivity`) and, with ``fallback: auto``, keeps the most
    sensitive ``k <= max_fp32_nodes`` of them in float. ``search: greedy`` (default) tries
    ``k = 1, 2, ...`` and keeps the first that passes, the smallest in ranking order; ``bisect``
    needs about ``log2(max_fp32_nodes)`` trials but assumes the metric improves with ``k``, which
    top-1 agreement on a small set of near-tie samples need not do. ``max_fp32_nodes`` counts
    quantized nodes; an activation folded into a node (Clip, Relu) falls back with it and is
    not counted. Every trial is recorded
    (``trials``: nodes excluded, verification metrics, p50 latency at batch 1, measured
    side by side with the float model), with ``sensitivity`` and ``latency`` (float, full
    INT8 and kept model, p50 ms). The post-check fails the build when no trial met the
    tolerances, naming the most sensitive nodes and what to change. Without ``fallback``
    the pass only quantizes. ``runtime`` (set by lowering from the recipe) is what runs the
    trials, the sensitivity models and the latency: the accuracy the search accepts is the
    deployed runtime's.
    """

    name = "quantize"
    version = "4"
    inputs = (
        Slot("model", ("onnx",)),
        Slot("table", ("calibration.table",)),
        Slot("calibration", ("calibration.data",), optional=True),
        Slot("reference", ("reference.outputs",), optional=True),
        Slot("validation", ("validation.data",), optional=True),
    )
    produces = "onnx.qdq"
    env_packages = ("onnxruntime", "onnx")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **FORMAT_OPTIONS,
            "fallback": {
                "enum": ["off", "auto"],
                "description": "Check the quantize stage's tolerances here: 'auto' keeps the most sensitive "
                "nodes in float until they hold, 'off' fails naming them. Unset: plain "
                "quantization, checked by verify alone.",
            },
            "max_fp32_nodes": {
                "type": "integer",
                "minimum": 0,
                "default": 8,
                "description": "Most quantized nodes 'auto' may keep in float.",
            },
            "search": {
                "enum": ["greedy", "bisect"],
                "default": "greedy",
                "description": "How 'auto' searches the count of float nodes.",
            },
            "sensitivity_samples": {
                "type": "integer",
                "minimum": 1,
                "default": 16,
                "description": "Calibration samples used to rank nodes by sensitivity.",
            },
            "tolerances": {
                **_TOLERANCES_SCHEMA,
                "description": "Set by lowering from verify (the quantize stage's tolerances).",
            },
            "batch_size": {
                "type": "integer",
                "minimum": 1,
                "description": "Validation batch size (set by lowering from verify.batch_size).",
            },
            "latency_iterations": {
                "type": "integer",
                "minimum": 1,
                "default": 40,
                "description": "Timed runs per trial for the side-by-side latency in the report.",
            },
            "runtime": _RUNTIME_SCHEMA,
        },
    }

    def uses_inputs(self, options: dict[str, Any]) -> set[str]:
        """Optional slots this invocation needs: all three when it checks itself (``fallback`` set),
        the calibration samples for ``bias_correction``."""
        wanted = {"calibration", "reference", "validation"} if options.get("fallback") else set()
        return wanted | ({"calibration"} if options.get("bias_correction", True) else set())

    def key_material(self, options: dict[str, Any], host: Any, sources: Any) -> dict[str, Any]:
        """Options minus those only the accuracy check reads, when ``fallback`` is unset."""
        material = super().key_material(options, host, sources)
        if not options.get("fallback"):
            material["options"] = {k: v for k, v in material["options"].items() if k not in _FALLBACK_ONLY}
        return material

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import onnx

        model_path = inputs["model"].file
        model = onnx.load(str(model_path))
        names = {n.name for n in model.graph.node}
        user_excl = list(options["nodes_to_exclude"])
        unknown = [n for n in user_excl if n not in names]
        if unknown:
            raise PassError(f"quantize.nodes_to_exclude: no node named {', '.join(unknown)} in the graph")
        table = inputs["table"].file
        out = ctx.workdir / "model.onnx"
        calibration = load_arrays(inputs["calibration"]) if "calibration" in inputs else None
        if options["bias_correction"]:
            ctx.progress("quantize and correct biases")
        tolerances = options.get("tolerances") or {}
        if not options.get("fallback") or not tolerances:
            quantize_model(model_path, table, out, options, calibration=calibration)
            return PassResult("model.onnx", metrics=self._facts(out, user_excl), meta=inputs["model"].meta)
        for slot in ("reference", "validation"):
            if slot not in inputs:
                raise PassError(f"quantize.fallback needs the '{slot}' input (add data.validation to the recipe)")

        runtime = options.get("runtime", "onnxruntime")
        evaluator = _validation_evaluator(inputs, ctx, options.get("batch_size", 16), runtime)
        timing: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(what: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timing[what] = timing.get(what, 0.0) + now - clock
            clock = now

        with tempfile.TemporaryDirectory(prefix="accelc-quant-trials-", dir=ctx.scratch) as tmp_dir:
            tmp = Path(tmp_dir)
            ctx.progress("full INT8: quantize and verify")
            full = quantize_model(model_path, table, tmp / "trial0.onnx", options, calibration=calibration)
            first = {"trial": 0, "fp32_nodes": [], **_trial_record(evaluator.metrics(full), tolerances)}
            trials, files = [first], {0: full}
            ranking: list[dict[str, Any]] = []
            kept: dict[str, Any] | None = first if first["passed"] else None
            sens_info: dict[str, Any] = {}
            lap("trials")
            if kept is None:
                ranking, sens_info = self._rank(ctx, inputs, options, model, full, tmp, evaluator, calibration)
                lap("sensitivity")
            if kept is None and options["fallback"] == "auto":

                def trial(k: int) -> dict[str, Any]:
                    fp32 = [r["node"] for r in ranking[:k]]
                    excl = user_excl + [n for r in ranking[:k] for n in r["nodes"]]
                    ctx.progress(f"fallback trial: {k} node(s) in float")
                    path = quantize_model(
                        model_path, table, tmp / f"trial{len(trials)}.onnx", options, excl, calibration=calibration
                    )
                    rec = {
                        "trial": len(trials),
                        "fp32_nodes": fp32,
                        **_trial_record(evaluator.metrics(path), tolerances),
                    }
                    files[rec["trial"]] = path
                    trials.append(rec)
                    return rec

                kept = search_fallback(ranking, options["max_fp32_nodes"], trial, options["search"])
                lap("trials")
            chosen = kept or first
            shutil.copyfile(files[chosen["trial"]], out)
            ctx.progress("latency of the trials, side by side")
            lat = p50_latency_ms(
                {"fp32": model_path, **{str(t): p for t, p in files.items()}},
                _latency_feeds(evaluator),
                default_threads(),
                options["latency_iterations"],
                runtime=runtime,
            )
            lap("latency")
        for rec in trials:
            rec["p50_ms"] = lat[str(rec["trial"])]
            rec["kept"] = kept is not None and rec is kept
        excluded = user_excl + [n for r in ranking[: len(chosen["fp32_nodes"])] for n in r["nodes"]]
        metrics = {
            "kept": "none (tolerances missed)"
            if kept is None
            else ("full INT8" if not kept["fp32_nodes"] else f"{len(kept['fp32_nodes'])} node(s) in float"),
            **self._facts(out, excluded),
            "fp32_nodes": chosen["fp32_nodes"] if kept is not None else [],
            "tolerances": tolerances,
            "runtime": runtime,
            "latency": {
                "batch": 1,
                "threads": default_threads(),
                "fp32_ms": lat["fp32"],
                "int8_ms": lat["0"],
                "kept_ms": lat[str(chosen["trial"])],
            },
            "timing_s": {k: round(v, 2) for k, v in timing.items()},
            "trials": trials,
            "sensitivity": ranking,
            **sens_info,
        }
        if kept is None:
            best = max(trials, key=lambda r: quality_key(r, tolerances))
            metrics["tolerance_failures"] = best["failures"]
            metrics["best_trial"] = best["trial"]
        return PassResult("model.onnx", metrics=metrics, meta=inputs["model"].meta)

    def _rank(
        self,
        ctx: PassContext,
        inputs: dict[str, Artifact],
        options: dict[str, Any],
        model: Any,
        full: Path,
        tmp: Path,
        validation: Evaluator,
        calibration: dict[str, np.ndarray] | None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Sensitivity ranking on ``sensitivity_samples`` calibration samples spread evenly over the set
        (validation samples when no calibration set is wired), against the float model's own outputs there."""
        import onnx

        if calibration is not None:
            arrays, source = calibration, "calibration"
        else:
            arrays, source = validation.arrays, "validation"
        total = len(arrays[ctx.signature.names[0]])
        # spread over the whole set: sets are often ordered by source image
        pick = np.unique(np.linspace(0, total - 1, min(options["sensitivity_samples"], total)).round().astype(int))
        arrays = {n: arrays[n][pick] for n in ctx.signature.names}
        ctx.progress("sensitivity: float model outputs")
        rt = validation.runtime
        probe = Evaluator(arrays, ctx.signature.names, np.zeros(0), validation.batch, validation.threads, runtime=rt)
        float_out = probe.outputs(inputs["model"].file)
        evaluator = Evaluator(arrays, ctx.signature.names, float_out, validation.batch, validation.threads, runtime=rt)
        units = fallback_units(model, onnx.load(str(full)), quantized_op_types(options), options["nodes_to_exclude"])
        only = tmp / "only.onnx"
        ranking = rank_units(
            units,
            lambda nodes: quantize_model(
                inputs["model"].file, inputs["table"].file, only, options, nodes_to_quantize=nodes, calibration=arrays
            ),
            evaluator,
            ctx.progress,
        )
        info = {
            "sensitivity_data": {
                "set": source,
                "samples": len(float_out),
                "compared_with": "float ONNX model",
                "method": "one node quantized at a time",
            }
        }
        return ranking, info

    @staticmethod
    def _facts(out: Path, excluded: list[str]) -> dict[str, Any]:
        import onnx

        q = onnx.load(str(out))
        facts = {
            "excluded_nodes": len(excluded),
            "quantize_linear_nodes": sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear"),
            "size_mib": round(out.stat().st_size / 2**20, 3),
        }
        corrected = recorded_correction(q)
        if corrected is not None:
            facts["bias_correction"] = corrected
        return facts

    def check(self, result_metrics: dict[str, Any], options: dict[str, Any]) -> None:
        """Fail when no trial met the tolerances, naming the most sensitive nodes and the option to change."""
        failures = result_metrics.get("tolerance_failures")
        if not failures:
            return
        top = result_metrics.get("sensitivity", [])[:5]
        ranked = ", ".join(f"{r['node']} ({r['op_type']}, cosine loss {r['cosine_loss']:.3g})" for r in top)
        msg = f"INT8 misses the tolerances: {'; '.join(failures)}. Most sensitive nodes: {ranked or 'none'}"
        if options.get("fallback") != "auto":
            msg += (
                ". To keep the most sensitive nodes in float until the tolerances hold, set "
                "quantize: {fallback: auto, max_fp32_nodes: N} in the recipe's passes"
            )
        else:
            n = options.get("max_fp32_nodes", 0)
            msg += (
                f". No fallback of at most {n} node(s) (quantize.max_fp32_nodes) met them; raise "
                "max_fp32_nodes or relax the quantize stage's tolerances"
            )
        raise VerificationError(msg)
