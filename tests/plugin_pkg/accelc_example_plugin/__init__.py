"""An accelc plugin living in its own package: registers the pass ``strip_doc_strings``.

The pass removes ``doc_string`` fields from every node of an ONNX graph (they carry
exporter stack traces and can be large) and records how many it removed.
"""

from __future__ import annotations

from accelc.pass_api import Pass, PassResult, Slot
from accelc.plugins import hookimpl


class StripDocStrings(Pass):
    """Remove node doc strings from an ONNX graph (same kind in, same kind out)."""

    name = "strip_doc_strings"
    version = "1"
    inputs = (Slot("model", ("onnx", "onnx.qdq")),)
    produces = "onnx"
    env_packages = ("onnx",)
    options_schema = {"type": "object", "additionalProperties": False, "properties": {}}

    def run(self, ctx, inputs, options):
        import onnx

        model = onnx.load(str(inputs["model"].file))
        removed = 0
        for node in model.graph.node:
            removed += bool(node.doc_string)
            node.doc_string = ""
        onnx.save(model, str(ctx.workdir / "model.onnx"))
        metrics = {"doc_strings_removed": removed, "nodes": len(model.graph.node)}
        return PassResult("model.onnx", metrics=metrics, meta=inputs["model"].meta)


@hookimpl
def accelc_register_passes():
    return [StripDocStrings]
