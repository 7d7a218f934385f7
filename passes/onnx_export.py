"""``export_onnx`` (torch.onnx.export) and ``onnxsim`` (onnx-simplifier, then onnx.checker)."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _root_cause(e: BaseException) -> str:
    """The innermost exception's first line, plus its ``Caused by: file:line`` when torch gives one."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = _ANSI.sub("", str(e))
    where = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("Caused by:")), "")
    return f"{type(e).__name__}: {_first_line(e)}" + (f" ({where})" if where else "")



def onnx_problem(file: Path) -> str | None:
    """Check of the ONNX kinds (``onnx``, ``onnx.qdq``): the file passes ``onnx.checker.check_model``."""
    import onnx

    try:
        onnx.checker.check_model(str(file))
    except Exception as e:  # checker.ValidationError, or a DecodeError for non-protobuf bytes
        text = str(e).strip()
        return f"fails onnx.checker: {text.splitlines()[0] if text else type(e).__name__}"
    return None


class ExportOnnx(Pass):
    """Export a ``torch.module`` to ONNX with ``torch.onnx.export``.

    Input names come from the recipe; each dynamic dimension becomes a symbolic ONNX
    dimension (``dynamic_shapes`` with ``torch.export.Dim(name, min, max)`` for the
    dynamo exporter, ``dynamic_axes`` for the legacy TorchScript exporter). The
    dynamo exporter is the default (torch's own default since 2.9); the example batch
    is taken as ``max(2, opt)`` so that torch.export does not specialise a dynamic
    batch to 1.
    """

    name = "export_onnx"
    version = "1"
    inputs = (Slot("model", ("torch.module",)),)
    produces = "onnx"
    env_packages = ("torch", "onnx", "onnxscript")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "opset": {"type": "integer", "minimum": 13, "maximum": 23, "default": 18},
            "dynamo": {
                "type": "boolean",
                "default": True,
                "description": "torch.export-based exporter (else TorchScript).",
            },
            "output_names": {"type": "array", "items": {"type": "string"}, "default": ["output"]},
        },
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import onnx
        import torch

        from accelc.passes.torch_runtime import load_module

        model = load_module(inputs["model"])  # its pythonpath first: a fresh process has not imported the model
        sig = ctx.signature
        args, dyn_shapes, dyn_axes = [], [], {}
        for spec in sig.inputs:
            sizes = {d.name: (max(2, d.opt) if d.max >= 2 else d.opt) for d in spec.dynamic}
            shape = spec.shape_with(**sizes)
            g = torch.Generator().manual_seed(0)
            dtype = getattr(torch, spec.dtype)
            if dtype.is_floating_point:
                args.append(torch.randn(*shape, generator=g).to(dtype))
            else:  # token ids, masks: ones are valid for every vocabulary (a random cast could be negative)
                args.append(torch.ones(*shape, dtype=dtype))
            dyn_shapes.append(
                {d.axis: torch.export.Dim(d.name, min=d.min, max=d.max) for d in spec.dynamic} or None
            )
            if spec.dynamic:
                dyn_axes[spec.name] = {d.axis: d.name for d in spec.dynamic}
        out_path = ctx.workdir / "model.onnx"
        kwargs: dict[str, Any] = dict(
            input_names=sig.names,
            output_names=options["output_names"],
            opset_version=options["opset"],
            dynamo=options["dynamo"],
        )
        if options["dynamo"]:
            kwargs["dynamic_shapes"] = tuple(dyn_shapes) if any(dyn_shapes) else None
            kwargs["external_data"] = False
        else:
            kwargs["dynamic_axes"] = dyn_axes or None
        sink = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
                warnings.simplefilter("ignore")
                logging.getLogger("torch.onnx").setLevel(logging.ERROR)
                torch.onnx.export(model, tuple(args), str(out_path), **kwargs)
        except Exception as e:
            raise PassError(
                f"export_onnx: torch.onnx.export failed ({'dynamo' if options['dynamo'] else 'torchscript'} exporter, "
                f"opset {options['opset']}): {_root_cause(e)}"
            ) from e
        m = onnx.load(str(out_path))
        try:
            onnx.checker.check_model(m)
        except onnx.checker.ValidationError as e:
            raise PassError(f"export_onnx: exported graph fails onnx.checker: {_first_line(e)}") from e
        return PassResult(
            "model.onnx",
            metrics={"nodes": len(m.graph.node), "opset": options["opset"]},
            meta={"input_names": sig.names, "output_names": [o.name for o in m.graph.output]},
        )


class OnnxSim(Pass):
    """Simplify an ONNX graph with onnx-simplifier (constant folding, shape inference, redundant-op
    elimination), then check the result with ``onnx.checker``. onnxsim's own check compares the
    simplified and the original graph on random inputs with ONNX Runtime."""

    name = "onnxsim"
    version = "1"
    inputs = (Slot("model", ("onnx",)),)
    produces = "onnx"
    env_packages = ("onnx", "onnxsim", "onnxruntime")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "check_n": {
                "type": "integer",
                "minimum": 0,
                "default": 1,
                "description": "Random-input comparisons.",
            },
            "skip_fuse_bn": {"type": "boolean", "default": False},
        },
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import onnx
        import onnxsim

        m = onnx.load(str(inputs["model"].file))
        before = len(m.graph.node)
        shapes = {
            i.name: list(i.shape_with(**{d.name: d.opt for d in i.dynamic})) for i in ctx.signature.inputs
        }
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # onnxsim prints "Checking 0/1..."
                simplified, ok = onnxsim.simplify(
                    m,
                    check_n=options["check_n"],
                    skip_fuse_bn=options["skip_fuse_bn"],
                    test_input_shapes=shapes,
                )
        except Exception as e:
            raise PassError(f"onnxsim: simplification failed: {_first_line(e)}") from e
        if not ok:
            raise PassError(
                "onnxsim: the simplified graph's outputs differ from the original's on random inputs"
            )
        try:
            onnx.checker.check_model(simplified)
        except onnx.checker.ValidationError as e:
            raise PassError(f"onnxsim: simplified graph fails onnx.checker: {_first_line(e)}") from e
        onnx.save(simplified, str(ctx.workdir / "model.onnx"))
        return PassResult(
            "model.onnx",
            metrics={"nodes_before": before, "nodes": len(simplified.graph.node)},
            meta=inputs["model"].meta,
        )
