"""``optimize_transformer``: ONNX Runtime's transformer graph optimizer (attention, embedding
layer norm, SkipLayerNormalization, GELU fusions) on an exported transformer.

ONNX Runtime's guidance for transformers on CPU is these fusions first, then dynamic INT8: a
fused ``Attention`` becomes one ``QAttention`` under ``quantize_dynamic``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot

#: ``onnxruntime.transformers.optimizer`` model types accelc passes through.
MODEL_TYPES = ("bert", "bart", "gpt2", "t5", "vit", "swin", "clip", "unet", "phi", "conformer")


def _heads_and_hidden(options: dict[str, Any], config: dict[str, Any]) -> tuple[int, int]:
    heads = options.get("num_heads") or config.get("num_attention_heads") or 0
    hidden = options.get("hidden_size") or config.get("hidden_size") or 0
    return int(heads), int(hidden)


class OptimizeTransformer(Pass):
    """Fuse a transformer's ONNX graph with ``onnxruntime.transformers.optimizer.optimize_model``.

    ``num_heads`` and ``hidden_size`` are read from the model's own config (the ``transformers``
    model source records them; options override, 0 lets the optimizer detect them). ``opt_level``
    1 (default) runs ONNX Runtime's basic optimizations before the Python fusions; 0 the fusions
    only. Metrics: ``fusions`` (``get_fused_operator_statistics()``, only the
    non-zero counts), ``nodes_before``/``nodes``, and ``num_heads``/``hidden_size`` used. The
    output graph holds ``com.microsoft`` operators: it runs on ONNX Runtime.
    """

    name = "optimize_transformer"
    version = "1"
    inputs = (Slot("model", ("onnx",)), Slot("source", ("torch.module",), source=True))
    produces = "onnx"
    env_packages = ("onnxruntime", "onnx")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "model_type": {"enum": list(MODEL_TYPES), "description": "Unset: the model config's, else bert."},
            "num_heads": {"type": "integer", "minimum": 0, "description": "Unset: from the model config."},
            "hidden_size": {"type": "integer", "minimum": 0, "description": "Unset: from the model config."},
            "opt_level": {
                "enum": [0, 1, 2, 99],
                "default": 1,
                "description": "1 (the optimizer's default for BERT): ONNX Runtime's basic graph optimizations "
                "(constant folding of the mask and shape subgraphs) first, which the Attention fusion needs.",
            },
            "use_gpu": {"type": "boolean", "default": False},
        },
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import onnx
        from onnxruntime.transformers.optimizer import optimize_model

        config = inputs["source"].meta.get("model_config") or {}
        heads, hidden = _heads_and_hidden(options, config)
        model_type = options.get("model_type") or (config.get("model_type") if config.get("model_type") in
                                                    MODEL_TYPES else "bert")
        before = len(onnx.load(str(inputs["model"].file)).graph.node)
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                opt = optimize_model(
                    str(inputs["model"].file),
                    model_type=model_type,
                    num_heads=heads,
                    hidden_size=hidden,
                    opt_level=options["opt_level"],
                    use_gpu=options["use_gpu"],
                )
        except Exception as e:
            raise PassError(f"optimize_transformer: {type(e).__name__}: {e}") from e
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        out = ctx.workdir / "model.onnx"
        opt.save_model_to_file(str(out))
        nodes = len(onnx.load(str(out)).graph.node)
        return PassResult(
            "model.onnx",
            metrics={
                "fusions": stats,
                "nodes_before": before,
                "nodes": nodes,
                "model_type": model_type,
                "num_heads": heads,
                "hidden_size": hidden,
            },
            meta={**inputs["model"].meta, "fusions": stats},
        )
