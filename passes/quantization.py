"""Static INT8 post-training quantization with ``onnxruntime.quantization``, as two passes.

``calibrate`` runs an ONNX Runtime calibrator (min-max, entropy or percentile) over
the calibration set and stores the per-tensor ranges (ORT's ``TensorsData`` JSON,
written by ``save_tensors_data``) as a ``calibration.table`` artifact. ``quantize``
inserts QuantizeLinear/DequantizeLinear pairs from that table
(``quantize_static(..., calibration_cache_path=...)``), so changing a quantize option
never recalibrates.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot

from .loading import iter_batches, load_arrays

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


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


class Calibrate(Pass):
    """Collect activation ranges over the calibration set with an ONNX Runtime calibrator.

    Methods (``onnxruntime.quantization.calibrate``): ``minmax`` (running min/max),
    ``entropy`` (KL-divergence threshold, TensorRT's classic method), ``percentile``
    (the given percentile of the absolute-value histogram, 99.999 by default).
    ``symmetric`` makes ranges symmetric around 0 (needed for symmetric INT8 activations,
    e.g. TensorRT).
    """

    name = "calibrate"
    version = "1"
    inputs = (Slot("model", ("onnx",)), Slot("data", ("calibration.data",)))
    produces = "calibration.table"
    final = False
    env_packages = ("onnxruntime", "onnx")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "method": {"enum": list(METHODS), "default": "minmax"},
            "percentile": {"type": "number", "exclusiveMinimum": 90, "maximum": 100, "default": 99.999},
            "num_bins": {"type": "integer", "minimum": 128, "maximum": 65536},
            "symmetric": {"type": "boolean", "default": False},
            "moving_average": {"type": "boolean", "default": False},
            "batch_size": {"type": "integer", "minimum": 1, "default": 1,
                           "description": "Samples per calibration batch (must fit the model's batch dimension)."},
        },
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

        method = CalibrationMethod[METHODS[options["method"]]]
        extra: dict[str, Any] = {"symmetric": options["symmetric"]}
        if options["method"] == "minmax":
            extra["moving_average"] = options["moving_average"]
        if options["method"] == "percentile":
            extra["percentile"] = options["percentile"]
        if options.get("num_bins"):
            extra["num_bins"] = options["num_bins"]
        data = load_arrays(inputs["data"])
        batch = min(options["batch_size"], ctx.signature.max_batch())
        logging.getLogger("onnxruntime").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory(prefix="accelc-calib-") as tmp:
            try:
                cal = create_calibrator(
                    Path(inputs["model"].file),
                    None,
                    augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=method,
                    extra_options=extra,
                )
                cal.collect_data(_Reader(data, ctx.signature.names, batch))
                ranges = cal.compute_data()
            except Exception as e:
                raise PassError(f"calibrate ({options['method']}): {type(e).__name__}: {e}") from e
        save_tensors_data(ranges, ctx.workdir / "calibration.json")
        n = len(data[ctx.signature.names[0]])
        return PassResult("calibration.json", metrics={"method": options["method"], "samples": n, "tensors": len(ranges.data)})


class Quantize(Pass):
    """Insert QDQ pairs (static INT8) from a calibration table with ``onnxruntime.quantization.quantize_static``.

    Defaults follow ORT's guidance for x86 CPUs with VNNI: u8 activations, s8 weights,
    per-channel weights, no reduce_range. For TensorRT use s8 activations with
    symmetric ranges (``activation_type: int8``, ``activation_symmetric: true``).
    ``nodes_to_exclude`` keeps the named nodes in float.
    """

    name = "quantize"
    version = "1"
    inputs = (Slot("model", ("onnx",)), Slot("table", ("calibration.table",)))
    produces = "onnx.qdq"
    env_packages = ("onnxruntime", "onnx")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "per_channel": {"type": "boolean", "default": True},
            "activation_type": {"enum": ["uint8", "int8"], "default": "uint8"},
            "weight_type": {"enum": ["int8", "uint8"], "default": "int8"},
            "reduce_range": {"type": "boolean", "default": False},
            "activation_symmetric": {"type": "boolean", "default": False},
            "weight_symmetric": {"type": "boolean", "default": True},
            "nodes_to_exclude": {"type": "array", "items": {"type": "string"}, "default": []},
            "op_types_to_quantize": {"type": "array", "items": {"type": "string"}},
        },
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import onnx
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.calibrate import load_tensors_data

        qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        table = load_tensors_data(inputs["table"].file)
        model = onnx.load(str(inputs["model"].file))
        names = {n.name for n in model.graph.node}
        unknown = [n for n in options["nodes_to_exclude"] if n not in names]
        if unknown:
            raise PassError(f"quantize.nodes_to_exclude: no node named {', '.join(unknown)} in the graph")
        out = ctx.workdir / "model.onnx"
        logging.getLogger().setLevel(logging.ERROR)  # ORT logs a pre-processing hint through the root logger
        try:
            quantize_static(
                str(inputs["model"].file),
                str(out),
                calibration_data_reader=None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=options.get("op_types_to_quantize"),
                per_channel=options["per_channel"],
                reduce_range=options["reduce_range"],
                activation_type=qt[options["activation_type"]],
                weight_type=qt[options["weight_type"]],
                nodes_to_exclude=options["nodes_to_exclude"],
                calibrate_method=table.calibration_method,
                calibration_cache_path=str(inputs["table"].file),
                extra_options={
                    "ActivationSymmetric": options["activation_symmetric"],
                    "WeightSymmetric": options["weight_symmetric"],
                },
            )
        except Exception as e:
            raise PassError(f"quantize: {type(e).__name__}: {e}") from e
        q = onnx.load(str(out))
        qnodes = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
        return PassResult(
            "model.onnx",
            metrics={
                "quantize_linear_nodes": qnodes,
                "excluded_nodes": len(options["nodes_to_exclude"]),
                "size_mib": round(out.stat().st_size / 2**20, 3),
            },
            meta=inputs["model"].meta,
        )
