"""``openvino_ir``: an ONNX model (float or QDQ) converted to OpenVINO IR for the CPU plugin.

OpenVINO reads the QDQ graph that ``quantize`` writes as it is: its low-precision
transformations turn each ``DequantizeLinear -> Conv`` with a quantized output into one INT8
convolution (VNNI ``vpdpbusd`` kernels on AVX-512 VNNI CPUs, the oneDNN ``brgconv`` family),
so the calibration, bias correction and float fallback chosen upstream carry over unchanged
(OpenVINO documentation, "Low Precision Transformations" and "Quantized models compute and
restrictions"). The conversion is ``openvino.convert_model`` then ``openvino.save_model``
with ``compress_to_fp16=False``: the default would round every float weight, including those
of the nodes kept in float, to FP16.

Why a second CPU runtime: on EfficientNet-Lite0 (2 threads, batch 1) the same INT8 QDQ file
runs with much less per-operator overhead in OpenVINO than in ONNX Runtime; see
``benchmarks/README.md`` for the side-by-side numbers.
"""

from __future__ import annotations

import collections
from typing import Any

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot
from accelc.runners import OPENVINO_PRECISIONS, openvino_compile, openvino_convert

#: Layer types of OpenVINO's CPU runtime model that carry the compute (GroupConvolution is
#: reported as Convolution there).
COMPUTE_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "FullyConnectedQuantizedLegacy", "MatMul")


def layer_precisions(compiled: Any) -> dict[str, int]:
    """How the CPU plugin runs the compute layers of a compiled model: ``{precision: count}``
    from the runtime model's ``runtimePrecision`` (``u8``/``i8``: an INT8 kernel, ``f32``,
    ``bf16``), over :data:`COMPUTE_LAYERS`."""
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in COMPUTE_LAYERS:
            counts[info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"] += 1
    return dict(sorted(counts.items()))


class OpenVinoIR(Pass):
    """Convert the ONNX model (float or QDQ) to OpenVINO IR (``model.xml`` + ``model.bin``).

    The pass compiles the IR once on this host's CPU plugin to prove that it loads, and reports
    how its compute layers run (``layers``: ``{"u8": 47, "f32": 3}`` means 47 INT8 kernels and
    3 float ones): a QDQ pattern the plugin cannot fuse shows up as a float layer here.
    ``inference_precision`` is recorded with the artifact and used by its runner as the CPU
    plugin's ``INFERENCE_PRECISION_HINT``: ``f32`` (default) keeps float ops in float32, as
    verified upstream; ``bf16`` runs them in bfloat16 where the CPU has it (faster float
    layers, about 1e-2 relative error; verify measures it).

    Raises:
        PassError: ``openvino`` is not installed, or the model does not convert or compile
            (the message names OpenVINO's first line of the reason).
    """

    name = "openvino_ir"
    version = "1"
    inputs = (Slot("model", ("onnx", "onnx.qdq")),)
    produces = "openvino.ir"
    requires = ("openvino",)
    env_packages = ("openvino",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "inference_precision": {
                "enum": list(OPENVINO_PRECISIONS),
                "default": "f32",
                "description": "The CPU plugin's INFERENCE_PRECISION_HINT for float ops: f32 keeps them in "
                "float32; bf16/f16 run them in 16 bits where the CPU supports it.",
            },
        },
    }

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        """The IR itself is host-independent, but the layer report comes from this CPU's plugin."""
        return {"cpu": host.cpu_model}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import openvino as ov

        ctx.progress("convert to OpenVINO IR")
        try:
            model = openvino_convert(inputs["model"].file)
        except PassError as e:
            raise PassError(f"openvino_ir: {e}") from e
        xml = ctx.workdir / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        ctx.progress("compile on the CPU plugin")
        compiled = openvino_compile(xml, threads=None, precision=options["inference_precision"])
        meta = {
            **inputs["model"].meta,
            "inference_precision": options["inference_precision"],
            "source_kind": inputs["model"].kind,
        }
        metrics = {
            "openvino": ov.__version__.split("-")[0],
            "inference_precision": options["inference_precision"],
            "layers": layer_precisions(compiled),
            "inputs": {p.get_any_name(): str(p.get_partial_shape()) for p in model.inputs},
        }
        return PassResult("model.xml", metrics=metrics, meta=meta)
