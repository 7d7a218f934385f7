"""Built-in plugin ``accelc.plugins.onnxruntime``: the ONNX pass family and the ONNX Runtime runtime.

Passes ``export_onnx``, ``onnxsim``, ``calibrate`` and ``quantize`` (static QDQ,
``onnxruntime.quantization``), ``optimize_transformer`` (``onnxruntime.transformers.optimizer``)
and ``quantize_dynamic`` (dynamic INT8); the kinds ``onnx``, ``onnx.qdq``, ``onnx.dynamic`` and
``calibration.table``; the ``onnxruntime`` runtime (runner and trial sessions on the CPU execution
provider); the ``onnxruntime`` host capability.
"""

from __future__ import annotations

from typing import Any

from accelc.artifacts import ArtifactKind, json_problem
from accelc.host import package_probe
from accelc.passes.dynamic_quantization import QuantizeDynamic
from accelc.passes.onnx_export import ExportOnnx, OnnxSim, onnx_problem
from accelc.passes.onnxruntime import OrtRunner, ort_trial_session
from accelc.passes.quantization import Calibrate, Quantize
from accelc.passes.transformer_optimizer import OptimizeTransformer
from accelc.runners import Runtime, runner_predictor

from .hookspecs import hookimpl


@hookimpl
def accelc_register_passes() -> list[Any]:
    return [ExportOnnx, OnnxSim, Calibrate, Quantize, OptimizeTransformer, QuantizeDynamic]


@hookimpl
def accelc_register_artifact_kinds() -> list[Any]:
    return [
        ArtifactKind("onnx", "model.onnx: float graph", onnx_problem, runnable=True),
        ArtifactKind(
            "onnx.qdq",
            "model.onnx: graph with QuantizeLinear/DequantizeLinear pairs",
            onnx_problem,
            runnable=True,
        ),
        ArtifactKind(
            "onnx.dynamic",
            "model.onnx: dynamic INT8 (MatMulInteger, QAttention, DynamicQuantizeLSTM; com.microsoft operators)",
            onnx_problem,
            runnable=True,
            requires=("onnxruntime",),
        ),
        ArtifactKind(
            "calibration.table", "calibration.json: ONNX Runtime TensorsData (per-tensor ranges)", json_problem
        ),
    ]


@hookimpl
def accelc_register_runtimes() -> list[Any]:
    return [
        Runtime(
            "onnxruntime",
            "ONNX Runtime, CPU execution provider (CUDA provider for device cuda when installed)",
            kinds=("onnx", "onnx.qdq", "onnx.dynamic"),
            runner=OrtRunner,
            predictor=runner_predictor(OrtRunner),
            session=ort_trial_session,
        )
    ]


@hookimpl
def accelc_register_host_capabilities() -> dict[str, Any]:
    return {"onnxruntime": package_probe("onnxruntime")}
