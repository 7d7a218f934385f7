"""Built-in plugin ``accelc.plugins.tensorrt``: TensorRT engines.

Passes ``trt_timing_cache`` and ``trt_engine``, the kinds ``trt.engine`` (device-bound: an
engine runs only on the GPU and TensorRT version that built it) and ``trt.timing_cache``, the
``tensorrt`` runtime (engine runner; its trials run on ONNX Runtime, since TensorRT does not
take ONNX files at run time) and the ``tensorrt`` host capability. Nothing here imports
``tensorrt`` at import time.
"""

from __future__ import annotations

from typing import Any

from accelc.artifacts import ArtifactKind
from accelc.passes.tensorrt import TrtEngine, TrtEngineRunner, TrtTimingCache, tensorrt_probe
from accelc.runners import Runtime, runner_predictor

from .hookspecs import hookimpl


@hookimpl
def accelc_register_passes() -> list[Any]:
    return [TrtTimingCache, TrtEngine]


@hookimpl
def accelc_register_artifact_kinds() -> list[Any]:
    return [
        ArtifactKind(
            "trt.engine",
            "model.engine: serialized TensorRT engine",
            None,
            runnable=True,
            device_bound=True,
            requires=("cuda", "tensorrt"),
        ),
        ArtifactKind("trt.timing_cache", "timing.cache: serialized TensorRT timing cache (empty: no timings yet)"),
    ]


@hookimpl
def accelc_register_runtimes() -> list[Any]:
    return [
        Runtime(
            "tensorrt",
            "NVIDIA TensorRT engines on CUDA",
            kinds=("trt.engine",),
            runner=TrtEngineRunner,
            predictor=runner_predictor(TrtEngineRunner),
        )
    ]


@hookimpl
def accelc_register_host_capabilities() -> dict[str, Any]:
    return {"tensorrt": tensorrt_probe}
