"""The built-in plugin: accelc's own passes, model and data sources and runners, registered
through the same hooks as any third-party plugin."""

from __future__ import annotations

from typing import Any

from accelc.passes.benchmark import Benchmark
from accelc.passes.cuda_graph import CudaGraph
from accelc.passes.dynamic_quantization import QuantizeDynamic
from accelc.passes.fusion import FuseModules
from accelc.passes.loading import LoadData, LoadModel, Reference
from accelc.passes.onnx_export import ExportOnnx, OnnxSim
from accelc.passes.openvino import OpenVinoIR
from accelc.passes.quantization import Calibrate, Quantize
from accelc.passes.tensorrt import TrtEngine, TrtEngineRunner, TrtTimingCache
from accelc.passes.torch_runtime import Export, Script, ToHalf, Trace
from accelc.passes.transformer_optimizer import OptimizeTransformer
from accelc.passes.verification import Verify
from accelc.runners import OpenVinoRunner, OrtRunner, TorchRunner
from accelc.runtime import RuntimeConfigRunner
from accelc.sources.data import ImagesSource, TensorsSource
from accelc.sources.models import PythonSource, TorchvisionSource
from accelc.sources.transformers import TextSource, TransformersSource

from .hookspecs import hookimpl


@hookimpl
def accelc_register_passes() -> list[Any]:
    return [
        LoadModel, LoadData, Reference, FuseModules, ExportOnnx, OnnxSim,
        Calibrate, Quantize, OpenVinoIR, Verify, Benchmark, TrtTimingCache, TrtEngine, CudaGraph,
        ToHalf, Trace, Script, Export, OptimizeTransformer, QuantizeDynamic,
    ]


@hookimpl
def accelc_register_model_sources() -> list[Any]:
    return [TorchvisionSource, PythonSource, TransformersSource]


@hookimpl
def accelc_register_data_sources() -> list[Any]:
    return [ImagesSource, TensorsSource, TextSource]


@hookimpl
def accelc_register_runners() -> dict[str, Any]:
    return {
        "onnx": OrtRunner,
        "onnx.qdq": OrtRunner,
        "onnx.dynamic": OrtRunner,
        "openvino.ir": OpenVinoRunner,
        "torch.module": TorchRunner,
        "torchscript": TorchRunner,
        "torch.exported": TorchRunner,
        "trt.engine": TrtEngineRunner,
        "runtime.config": RuntimeConfigRunner,
    }
