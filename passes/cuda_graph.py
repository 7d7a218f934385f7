"""``cuda_graph``: capture and replay the final runtime in a CUDA graph, and write the runtime config."""

from __future__ import annotations

from typing import Any

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot


class CudaGraph(Pass):
    """Check CUDA Graph capture/replay per static input shape and write ``runtime.json`` for the loader."""

    name = "cuda_graph"
    version = "1"
    inputs = (Slot("model", ("trt.engine", "torch.module", "torchscript", "torch.exported")),)
    produces = "runtime.config"
    requires = ("cuda",)
    options_schema = {"type": "object", "additionalProperties": False, "properties": {}}

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        cuda = host.cuda or {}
        return {"gpu": cuda.get("name"), "sm": cuda.get("sm")}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        raise PassError("cuda_graph: CUDA Graph capture is not implemented yet (issue #3)")
