"""Built-in target profiles."""

from __future__ import annotations

from typing import Any

from accelc.passes.tensorrt import SUPPORTED_TENSORRT
from accelc.targets import Pipeline, TargetProfile

from .hookspecs import hookimpl

#: x86-64 CPU, ONNX Runtime CPU execution provider (default) or OpenVINO's CPU plugin. INT8 as
#: QDQ with u8 activations and s8 per-channel weights (ORT's recommendation for VNNI CPUs; the
#: same file is what OpenVINO's low-precision transformations read), so both runtimes share the
#: pipeline up to quantize and OpenVINO adds its IR conversion. Lowering points the trials of
#: calibrate/quantize at the recipe's runtime; OpenVINO's INT8 stage is verified as the IR it
#: deploys (the QDQ file in between is not run on ONNX Runtime).
#: The CPU INT8 default is accuracy-aware (what Olive's and Optimum's accuracy-driven quantization
#: do): calibrate tries min-max, entropy and percentile ranges on the validation set and keeps the
#: best; quantize verifies the quantize stage's tolerances itself and keeps the most sensitive nodes
#: in float until they hold (at most ``max_fp32_nodes``), failing with their names when none does.
#: A build that verifies nothing (no data.validation, verify off, no tolerances) quantizes plainly.
_CPU_ACCURACY_AWARE_INT8 = {"calibrate": {"method": "auto"}, "quantize": {"fallback": "auto"}}

CPU = TargetProfile(
    name="cpu",
    description="x86-64 CPU, ONNX Runtime CPU execution provider or OpenVINO CPU plugin",
    device="cpu",
    capabilities=("x86_64", "onnxruntime"),
    default_runtime="onnxruntime",
    runtimes={
        "onnxruntime": {
            "fp32": Pipeline.of("fuse_modules", "export_onnx", "onnxsim", verify_after=("onnxsim",)),
            "int8": Pipeline.of(
                "fuse_modules", "export_onnx", "onnxsim", "calibrate", "quantize",
                verify_after=("onnxsim", "quantize"), when_verified=_CPU_ACCURACY_AWARE_INT8,
            ),
        },
        "openvino": {
            "fp32": Pipeline.of(
                "fuse_modules", "export_onnx", "onnxsim", "openvino_ir", verify_after=("onnxsim", "openvino_ir")
            ),
            "int8": Pipeline.of(
                "fuse_modules", "export_onnx", "onnxsim", "calibrate", "quantize", "openvino_ir",
                verify_after=("onnxsim", "openvino_ir"), when_verified=_CPU_ACCURACY_AWARE_INT8,
            ),
        },
    },
    families={"transformer": {"onnxruntime": {
        # ONNX Runtime's guidance for transformers is dynamic INT8 (no calibration), after the
        # transformer optimizer's fusions for FP32. For INT8 the unfused TorchScript export is
        # quantized: its Q, K and V projections stay MatMuls, whose outlier channels
        # quantize_dynamic splits off (a fused Attention hides them), and ONNX Runtime still
        # fuses LayerNorm, GELU and the INT8 MatMuls when it loads the model. Measured on
        # all-MiniLM-L6-v2 (benchmarks/README.md): full INT8 then meets recall@5 0.95, which the
        # fused graph reached only with 3 (with the split) to 9 (without) MatMuls left in float.
        "fp32": Pipeline.of(("export_onnx", {"dynamo": False}), "optimize_transformer",
                            verify_after=("optimize_transformer",)),
        "int8": Pipeline.of(("export_onnx", {"dynamo": False}), "quantize_dynamic",
                            verify_after=("quantize_dynamic",)),
    }}},
)

#: TensorRT releases the GPU profiles accept (``trt_engine`` checks the installed one): see
#: :data:`accelc.passes.tensorrt.SUPPORTED_TENSORRT` and docs/gpu.md for the support matrix.
TENSORRT_VERSIONS = SUPPORTED_TENSORRT

#: TensorRT INT8 by explicit quantization: symmetric s8 activations and per-channel
#: symmetric s8 weights in Q/DQ form (TensorRT's placement rules), entropy calibration,
#: all with onnxruntime.quantization (docs/gpu.md says why not ModelOpt). The timing cache
#: is its own artifact, fed to the engine build.
_TRT_INT8 = Pipeline.of(
    "fuse_modules", "export_onnx", "onnxsim",
    ("calibrate", {"method": "entropy", "symmetric": True}),
    ("quantize", {"activation_type": "int8", "weight_type": "int8", "per_channel": True,
                  "activation_symmetric": True, "weight_symmetric": True}),
    "trt_timing_cache", ("trt_engine", {"tensorrt_versions": TENSORRT_VERSIONS}), "cuda_graph",
    verify_after=("onnxsim", "quantize", "trt_engine", "cuda_graph"),
)
#: TensorRT FP32: the float ONNX graph, strongly typed (no reduced precision anywhere).
_TRT_FP32 = Pipeline.of(
    "fuse_modules", "export_onnx", "onnxsim",
    "trt_timing_cache", ("trt_engine", {"tensorrt_versions": TENSORRT_VERSIONS}), "cuda_graph",
    verify_after=("onnxsim", "trt_engine", "cuda_graph"),
)
#: PyTorch FP16: BN folded, weights cast to float16, torch.export, CUDA graphs at load.
_TORCH_FP16 = Pipeline.of(
    "fuse_modules", ("to_half", {"dtype": "float16"}), "export", "cuda_graph",
    verify_after=("to_half", "export", "cuda_graph"),
)
#: PyTorch FP32: BN folded, torch.export, CUDA graphs at load.
_TORCH_FP32 = Pipeline.of("fuse_modules", "export", "cuda_graph", verify_after=("export", "cuda_graph"))

#: Torch-TensorRT FP16: weights cast to float16, torch.export (checked on the CPU), then
#: torch_tensorrt.compile (dynamo IR; a strongly typed FP16 graph) saved as an ExportedProgram.
#: Its own runtime rather than a step of ``torch``: it needs TensorRT and torch-tensorrt where the
#: artifact is built *and* loaded, which a ``runtime: torch`` recipe must never need.
_TORCH_TRT_FP16 = Pipeline.of(
    "fuse_modules", ("to_half", {"dtype": "float16"}), "export",
    ("torch_tensorrt", {"tensorrt_versions": TENSORRT_VERSIONS}),
    verify_after=("to_half", "export", "torch_tensorrt"),
)
_TORCH_TRT_FP32 = Pipeline.of(
    "fuse_modules", "export", ("torch_tensorrt", {"tensorrt_versions": TENSORRT_VERSIONS}),
    verify_after=("export", "torch_tensorrt"),
)
#: ONNX Runtime GPU (onnxruntime-gpu): CUDA EP, with the TensorRT EP first where TensorRT is
#: installed. INT8 is the TensorRT Q/DQ graph of the tensorrt pipeline, run by the TensorRT EP
#: (required: the CUDA EP would run the Q/DQ graph in float).
_ORT_GPU_FP32 = Pipeline.of(
    "fuse_modules", "export_onnx", "onnxsim", "ort_gpu_session", verify_after=("onnxsim", "ort_gpu_session"),
)
_ORT_GPU_INT8 = Pipeline.of(
    "fuse_modules", "export_onnx", "onnxsim",
    ("calibrate", {"method": "entropy", "symmetric": True}),
    ("quantize", {"activation_type": "int8", "weight_type": "int8", "per_channel": True,
                  "activation_symmetric": True, "weight_symmetric": True}),
    ("ort_gpu_session", {"tensorrt": "on", "int8": True}),
    verify_after=("onnxsim", "quantize", "ort_gpu_session"),
)

_GPU_RUNTIMES = {
    "tensorrt": {"int8": _TRT_INT8, "fp32": _TRT_FP32},
    "torch": {"fp16": _TORCH_FP16, "fp32": _TORCH_FP32},
    "torch_tensorrt": {"fp16": _TORCH_TRT_FP16, "fp32": _TORCH_TRT_FP32},
    "onnxruntime": {"int8": _ORT_GPU_INT8, "fp32": _ORT_GPU_FP32},
}


def _gpu(name: str, description: str, sm: tuple[int, int]) -> TargetProfile:
    """A profile for one GPU architecture. ``sm==XY`` is required of every node that runs on the
    GPU: an engine (and its timings) belongs to the device that built it."""
    return TargetProfile(
        name=name,
        description=description,
        device="cuda",
        capabilities=("cuda", f"sm=={sm[0] * 10 + sm[1]}"),
        compute_capability=sm,
        default_runtime="tensorrt",
        execution_provider="TensorrtExecutionProvider",
        runtimes=_GPU_RUNTIMES,
        notes=f"TensorRT {TENSORRT_VERSIONS}",
    )


T4 = _gpu("t4", "NVIDIA T4 (Turing, sm_75), TensorRT INT8 or PyTorch FP16", (7, 5))
A100 = _gpu("a100", "NVIDIA A100 (Ampere, sm_80), TensorRT INT8 or PyTorch FP16", (8, 0))
H100 = _gpu("h100", "NVIDIA H100 (Hopper, sm_90), TensorRT INT8 or PyTorch FP16", (9, 0))

#: Whatever CUDA device this host has: no compute capability is required (TensorRT itself
#: needs sm_75+); the GPU found (name, compute capability) enters every device-bound cache key
#: and the build's report. PyTorch is the default runtime: it needs nothing beyond torch.
CUDA = TargetProfile(
    name="cuda",
    description="the CUDA device this host has (read at build time), PyTorch FP16 or TensorRT INT8",
    device="cuda",
    capabilities=("cuda",),
    compute_capability=None,
    default_runtime="torch",
    execution_provider="CUDAExecutionProvider",
    runtimes=_GPU_RUNTIMES,
    notes=f"TensorRT {TENSORRT_VERSIONS}",
)


@hookimpl
def accelc_register_targets() -> list[Any]:
    return [CPU, T4, A100, H100, CUDA]
