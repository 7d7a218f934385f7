"""Built-in plugin ``accelc.plugins.gpu_runtimes``: the GPU runtimes beyond TensorRT engines and
eager torch, registered through the same hooks as any third-party plugin.

The ``torch_tensorrt`` pass and runtime (Torch-TensorRT's dynamo IR, saved as an
ExportedProgram with embedded engines: kind ``torch_tensorrt.exported``) and the
``ort_gpu_session`` pass (ONNX Runtime's CUDA / TensorRT execution providers from the
``onnxruntime-gpu`` wheel: kind ``ort.session``, a ``session.json`` next to ``model.onnx``).
Nothing here imports torch_tensorrt, tensorrt or onnxruntime at import time.
"""

from __future__ import annotations

from typing import Any

from accelc.artifacts import ArtifactKind, json_problem, zip_problem
from accelc.passes.ort_providers import OrtGpuSession, OrtSessionRunner
from accelc.passes.torch_trt import TorchTensorRT, TorchTensorRTRunner
from accelc.runners import Runtime, runner_predictor

from .hookspecs import hookimpl


@hookimpl
def accelc_register_passes() -> list[Any]:
    return [TorchTensorRT, OrtGpuSession]


@hookimpl
def accelc_register_artifact_kinds() -> list[Any]:
    return [
        ArtifactKind(
            "torch_tensorrt.exported",
            "model.ep: Torch-TensorRT ExportedProgram with embedded engines",
            zip_problem("torch zip archive (torch_tensorrt.save, output_format='exported_program')"),
            runnable=True,
            device_bound=True,
            requires=("cuda", "tensorrt"),
        ),
        ArtifactKind(
            "ort.session",
            "session.json: ONNX Runtime GPU providers, next to model.onnx",
            json_problem,
            runnable=True,
            device_bound=True,
            requires=("cuda",),
        ),
    ]


@hookimpl
def accelc_register_runtimes() -> list[Any]:
    return [
        Runtime(
            "torch_tensorrt",
            "Torch-TensorRT (dynamo IR) ExportedProgram with embedded TensorRT engines, on CUDA",
            kinds=("torch_tensorrt.exported",),
            runner=TorchTensorRTRunner,
            predictor=runner_predictor(TorchTensorRTRunner),
        )
    ]


@hookimpl
def accelc_register_runners() -> dict[str, Any]:
    # ``ort.session`` belongs to the ``onnxruntime`` runtime (registered by accelc.plugins.onnxruntime);
    # this plugin adds only the runner of its GPU-provider artifact.
    return {"ort.session": OrtSessionRunner}
