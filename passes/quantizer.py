"""The ONNX Runtime quantizer adapter: ``quantize_static`` driven from a stored calibration table,
with the format options accelc exposes, the QDQ edits of :mod:`accelc.passes.qdq` and bias
correction applied after it."""


import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from accelc.errors import PassError
from accelc.runners import SessionFactoryFn, default_threads

from .bias_correction import correct_bias
from .qdq import float_units, pin_float_nodes, unquantize_float_inputs

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "mse": "MinMax"}

#: Histogram bins for ``entropy`` when ``num_bins`` is not set. ORT's own default (128) equals
#: its 128 quantized bins, which leaves the KL search a single candidate: the full min-max range.
ENTROPY_DEFAULT_BINS = 512

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




@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the logger ``name`` (``""``: the root logger) to at least ``level`` for the block, then
    put its level back, so a library's chatter is silenced without changing the process's logging."""
    logger = logging.getLogger(name or None)
    old = logger.level
    logger.setLevel(max(level, old))
    try:
        yield
    finally:
        logger.setLevel(old)


def format_options(options: dict[str, Any]) -> dict[str, Any]:
    """The format options (:data:`FORMAT_OPTIONS`) of ``options``, defaults filled in for missing ones."""
    opts = {k: spec.get("default") for k, spec in FORMAT_OPTIONS.items()}
    opts.update({k: v for k, v in options.items() if k in FORMAT_OPTIONS})
    return opts


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
    session: SessionFactoryFn | None = None,
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
    model's ``metadata_props`` (:func:`accelc.passes.bias_correction.recorded_correction`),
    measured with ``session`` (the session factory of the runtime that deploys the model;
    ``None``: ONNX Runtime).

    Raises:
        PassError: ``quantize_static`` or the bias correction failed, or ``bias_correction``
            is on and no ``calibration`` samples were given.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    opts = format_options(options)
    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    exclude = list(opts["nodes_to_exclude"] if nodes_to_exclude is None else nodes_to_exclude)
    try:
        with quiet_logger(""):  # ORT logs a pre-processing hint through the root logger
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
    _correct(model, out, opts, calibration, session)
    return out


def _correct(
    model: Path, out: Path, opts: dict[str, Any], calibration: dict[str, np.ndarray] | None,
    session: SessionFactoryFn | None,
) -> None:
    """Bias-correct ``out`` against ``model`` when ``opts["bias_correction"]`` (see :func:`quantize_model`)."""
    if not opts["bias_correction"]:
        return
    if calibration is None:
        raise PassError("quantize.bias_correction needs the calibration samples (add data.calibration)")
    try:
        correct_bias(model, out, calibration, threads=default_threads(), session=session)
    except Exception as e:
        raise PassError(f"quantize: bias correction: {type(e).__name__}: {e}") from e


def exclude_nodes(
    model: Path,
    raw: Path,
    out: Path,
    options: dict[str, Any],
    nodes: list[str],
    calibration: dict[str, np.ndarray] | None = None,
    session: SessionFactoryFn | None = None,
) -> Path:
    """``raw`` (a QDQ model :func:`quantize_model` made from ``model`` without bias correction) with
    ``nodes`` (float-graph names; folded activations may be among them) kept in float, into ``out``.

    The same model as ``quantize_model(model, table, out, options, nodes_to_exclude + nodes)``,
    by graph surgery (:func:`accelc.passes.qdq.float_units`) instead of a second
    ``quantize_static`` call: the named nodes get their float weights and biases back, Q/DQ pairs
    between float nodes go, the ``float_node_inputs`` layout and the pins are applied as
    ``quantize_model`` applies them, then the whole model is bias-corrected afresh on
    ``calibration`` (the upstream float nodes change what every later layer must correct).
    Measured on EfficientNet-Lite0 against ``quantize_static`` with ``nodes_to_exclude`` (1 to 6
    Conv/Gemm nodes in float, bias-corrected): the same verification metrics to the last digit,
    in 0.02 s instead of about 0.8 s per model (tests/test_qdq_surgery.py checks the outputs).
    With no ``nodes`` it is ``raw`` bias-corrected: :func:`quantize_model`'s own output.

    Raises:
        PassError: a node is not in ``model``, or the bias correction failed (see :func:`quantize_model`).
    """
    import onnx

    opts = format_options(options)
    float_model = onnx.load(str(model))
    q = onnx.load(str(raw))
    excluded = set(opts["nodes_to_exclude"]) | set(nodes)
    try:
        float_units(q, float_model, nodes, excluded, quantized_op_types(opts))
    except ValueError as e:
        raise PassError(f"quantize: {e}") from e
    if opts.get("float_node_inputs") == "float":
        unquantize_float_inputs(q, float_model, excluded)
    pin_float_nodes(q)
    onnx.save(q, str(out))
    _correct(model, out, opts, calibration, session)
    return out

