"""``fuse_modules``: fold BatchNorm into the preceding convolution (eval mode), checked for equality.

Algorithm: ``torch.fx`` symbolic trace, then for every ``Conv{1,2,3}d -> BatchNorm``
pair where the conv output feeds only the BN, replace the conv by
``torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)`` and drop the BN. This is
``torch.fx.experimental.optimization.fuse`` with one change: subclasses of
``nn.Conv*d`` (e.g. TF-style "same padding" convs) are kept as leaf modules so that
they can be folded too. Following activations (ReLU, ReLU6) are left to the backend:
ONNX Runtime and TensorRT fuse Conv+activation themselves, and in eager float there is
no faster fused module than the conv itself.
"""

from __future__ import annotations

from typing import Any

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot


def fold_conv_bn(model: Any) -> tuple[Any, int]:
    """Return ``(graph_module, folded_count)``; ``model`` must be in eval mode.

    Raises ``torch.fx`` trace errors for models with data-dependent control flow.
    """
    import copy

    from torch import fx, nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    bns = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    class ConvLeafTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, convs + bns) or super().is_leaf_module(m, qualname)

    model = copy.deepcopy(model).eval()
    graph = ConvLeafTracer().trace(model)
    gm = fx.GraphModule(model, graph, model.__class__.__name__)
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), bns):
            continue
        prev = node.args[0] if node.args else None
        if (
            not isinstance(prev, fx.Node)
            or prev.op != "call_module"
            or not isinstance(modules.get(prev.target), convs)
        ):
            continue
        if len(prev.users) > 1:
            continue
        conv, bn = modules[prev.target], modules[node.target]
        if not bn.track_running_stats:
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        parent_name, _, attr = prev.target.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        setattr(parent, attr, fused)
        modules[prev.target] = fused
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded


class FuseModules(Pass):
    """Fold Conv+BatchNorm pairs (eval mode) with torch.fx; outputs checked equal within tolerance.

    The check feeds one seeded random input of the recipe's example shape through the
    original and the fused model and requires ``max|a-b| <= atol + rtol * max|a|``.
    """

    name = "fuse_modules"
    version = "1"
    inputs = (Slot("model", ("torch.module",)),)
    produces = "torch.module"
    env_packages = ("torch",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "atol": {"type": "number", "minimum": 0, "default": 1e-4},
            "rtol": {"type": "number", "minimum": 0, "default": 1e-4},
            "on_trace_failure": {
                "enum": ["error", "skip"],
                "default": "skip",
                "description": "Model torch.fx cannot trace: 'skip' passes it on unfused (and says so), 'error' fails.",
            },
        },
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import torch

        from accelc.passes.torch_runtime import load_module

        model = load_module(inputs["model"])  # its pythonpath first: a fresh process has not imported the model
        try:
            fused, folded = fold_conv_bn(model)
        except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError...
            if options["on_trace_failure"] == "error":
                raise PassError(f"fuse_modules: torch.fx cannot trace the model: {e}") from e
            torch.save(model, ctx.workdir / "model.pt")
            return PassResult(
                "model.pt",
                metrics={"folded_conv_bn": 0, "skipped": f"not fx-traceable: {type(e).__name__}"},
                meta=inputs["model"].meta,
            )
        g = torch.Generator().manual_seed(0)
        args = [torch.randn(*i.shape, generator=g).to(getattr(torch, i.dtype)) for i in ctx.signature.inputs]
        with torch.inference_mode():
            a = model(*args)
            b = fused(*args)
        a, b = (a[0] if isinstance(a, (tuple, list)) else a), (b[0] if isinstance(b, (tuple, list)) else b)
        diff = float((a - b).abs().max())
        bound = options["atol"] + options["rtol"] * float(a.abs().max())
        if not diff <= bound:
            raise PassError(
                f"fuse_modules: fused model differs from the original by {diff:.3g} (> {bound:.3g})"
            )
        torch.save(fused, ctx.workdir / "model.pt")
        return PassResult(
            "model.pt", metrics={"folded_conv_bn": folded, "max_abs_diff": diff}, meta=inputs["model"].meta
        )
