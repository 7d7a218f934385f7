"""Built-in target profiles."""

from __future__ import annotations

from typing import Any

from accelc.targets import Pipeline, TargetProfile

from .hookspecs import hookimpl

#: x86-64 CPU, ONNX Runtime CPU execution provider. INT8 as QDQ with u8 activations and
#: s8 per-channel weights (ORT's recommendation for VNNI CPUs).
CPU = TargetProfile(
    name="cpu",
    description="x86-64 CPU, ONNX Runtime CPU execution provider",
    device="cpu",
    capabilities=("x86_64", "onnxruntime"),
    default_runtime="onnxruntime",
    runtimes={
        "onnxruntime": {
            "fp32": Pipeline.of("fuse_modules", "export_onnx", "onnxsim", verify_after=("onnxsim",)),
            "int8": Pipeline.of(
                "fuse_modules", "export_onnx", "onnxsim", "calibrate", "quantize",
                verify_after=("onnxsim", "quantize"),
            ),
        }
    },
)

#: TensorRT INT8 by explicit quantization: symmetric s8 activations and per-channel
#: symmetric s8 weights in Q/DQ form (TensorRT's placement rules), entropy calibration.
_TRT_INT8 = Pipeline.of(
    "fuse_modules", "export_onnx", "onnxsim",
    ("calibrate", {"method": "entropy", "symmetric": True}),
    ("quantize", {"activation_type": "int8", "weight_type": "int8", "per_channel": True,
                  "activation_symmetric": True, "weight_symmetric": True}),
    "trt_engine", "cuda_graph",
    verify_after=("onnxsim", "quantize", "trt_engine"),
)


def _gpu(name: str, description: str, sm: tuple[int, int]) -> TargetProfile:
    return TargetProfile(
        name=name,
        description=description,
        device="cuda",
        capabilities=("cuda", f"sm>={sm[0] * 10 + sm[1]}"),
        compute_capability=sm,
        default_runtime="tensorrt",
        execution_provider="TensorrtExecutionProvider",
        runtimes={"tensorrt": {"int8": _TRT_INT8}},
    )


T4 = _gpu("t4", "NVIDIA T4 (Turing, sm_75), TensorRT, INT8", (7, 5))


@hookimpl
def accelc_register_targets() -> list[Any]:
    return [CPU, T4]
