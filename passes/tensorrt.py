"""``trt_engine``: build a serialized TensorRT engine from a (Q/DQ) ONNX graph."""

from __future__ import annotations

from typing import Any

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot


class TrtEngine(Pass):
    """Build a TensorRT engine by explicit quantization (Q/DQ nodes carry INT8; FP16 from an FP16 graph)."""

    name = "trt_engine"
    version = "1"
    inputs = (Slot("model", ("onnx.qdq", "onnx")),)
    produces = "trt.engine"
    requires = ("cuda", "tensorrt")
    env_packages = ("tensorrt",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "workspace_mib": {"type": "integer", "minimum": 16, "default": 1024},
        },
    }

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        cuda = host.cuda or {}
        return {"gpu": cuda.get("name"), "sm": cuda.get("sm"), "tensorrt": host.tensorrt_version}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        raise PassError("trt_engine: the TensorRT engine builder is not implemented yet (issue #3)")
