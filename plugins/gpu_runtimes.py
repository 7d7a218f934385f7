"""Built-in plugin: the GPU runtimes beyond TensorRT engines and torch (Torch-TensorRT, ONNX Runtime's
GPU providers), registered through the same hooks as any third-party plugin."""

from __future__ import annotations

from typing import Any

from accelc.passes.ort_providers import OrtGpuSession, OrtSessionRunner
from accelc.passes.torch_trt import TorchTensorRT, TorchTensorRTRunner

from .hookspecs import hookimpl


@hookimpl
def accelc_register_passes() -> list[Any]:
    return [TorchTensorRT, OrtGpuSession]


@hookimpl
def accelc_register_runners() -> dict[str, Any]:
    return {"torch_tensorrt.exported": TorchTensorRTRunner, "ort.session": OrtSessionRunner}
