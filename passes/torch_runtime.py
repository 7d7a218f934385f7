"""The PyTorch-native runtime: ``to_half``, ``trace``, ``script`` (TorchScript) and ``export`` (torch.export).

These passes run on the CPU (what they produce loads on any device with ``map_location`` or
``.to(device)``); ``verify``, ``benchmark`` and ``cuda_graph`` then run the result on the
target's device through the runners. ``trace`` and ``script`` use TorchScript, which
PyTorch deprecates in favour of ``torch.export``: the ``FutureWarning`` it raises is
recorded (``deprecated_upstream`` in the metrics) instead of being printed, and tracer
warnings (a Python value that became a constant) are counted, logged and checked by
running the traced module at a second batch size.

Every pass keeps the input artifact's meta (input names, ``pythonpath``) and records
``input_dtype``, the dtype the model's floating-point inputs take (``float16`` after
``to_half``), which the runners cast feeds to.
"""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stdout
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot
from accelc.runners import flatten_outputs, scoped_sys_path
from accelc.signature import InputSignature

_CHECK_SCHEMA = {
    "atol": {"type": "number", "minimum": 0, "default": 1e-4},
    "rtol": {"type": "number", "minimum": 0, "default": 1e-3},
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_module(artifact: Artifact) -> Any:
    """The pickled ``nn.Module`` of a ``torch.module`` artifact, on the CPU in eval mode
    (its ``pythonpath`` meta is put on ``sys.path`` first)."""
    import torch

    # Our own cache entry, digest-checked before it is opened: a full unpickle is trusted here only.
    with scoped_sys_path(artifact.meta.get("pythonpath", [])):
        return torch.load(artifact.file, map_location="cpu", weights_only=False).eval()


def example_batches(signature: InputSignature) -> tuple[int, int | None]:
    """``(example batch, check batch)``: the batch used to trace or export, ``max(2, opt)`` when
    axis 0 is dynamic (so a dynamic batch is not specialised to 1), and a second size in the
    dynamic range to check the result at (``None`` when the batch is static)."""
    d = signature.inputs[0].batch_dim()
    if d is None:
        return signature.inputs[0].shape[0], None
    example = max(2, d.opt) if d.max >= 2 else d.opt
    other = next((b for b in (d.min, d.max, d.opt) if b != example), None)
    return example, other


def example_inputs(signature: InputSignature, batch: int, float_dtype: str, seed: int = 0) -> tuple[Any, ...]:
    """Seeded inputs of the recipe's shapes with axis 0 (when dynamic) set to ``batch``;
    floating-point inputs are standard normal in ``float_dtype``, integer inputs zeros."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in signature.inputs:
        d = spec.batch_dim()
        shape = spec.shape_with(**{d.name: batch}) if d else spec.shape
        dt = getattr(torch, spec.dtype)
        if torch.empty(0, dtype=dt).is_floating_point():
            out.append(torch.randn(*shape, generator=g).to(getattr(torch, float_dtype)))
        else:
            out.append(torch.zeros(*shape, dtype=dt))
    return tuple(out)


def compare(reference: Any, candidate: Any, atol: float, rtol: float, what: str) -> float:
    """Max abs difference between two models' (flattened) outputs; raises ``PassError`` naming
    ``what`` when the output structure or shapes differ or the difference exceeds
    ``atol + rtol * max|reference|``."""
    ref, got = flatten_outputs(reference), flatten_outputs(candidate)
    if len(ref) != len(got):
        raise PassError(f"{what}: {len(got)} outputs, the source model has {len(ref)}")
    worst = 0.0
    for r, c in zip(ref, got, strict=True):
        if tuple(r.shape) != tuple(c.shape):
            raise PassError(f"{what}: output shape {list(c.shape)} differs from the source model's {list(r.shape)}")
        r32, c32 = r.detach().float(), c.detach().float()
        diff = float((r32 - c32).abs().max()) if r.numel() else 0.0
        bound = atol + rtol * (float(r32.abs().max()) if r.numel() else 0.0)
        if not diff <= bound:
            raise PassError(f"{what}: outputs differ from the source model by {diff:.3g} (> {bound:.3g})")
        worst = max(worst, diff)
    return worst


def _split_warnings(caught: list[warnings.WarningMessage]) -> tuple[bool, list[str]]:
    """(whether TorchScript's deprecation warning was raised, distinct other warning messages)."""
    deprecated, others = False, []
    for w in caught:
        msg = str(w.message)
        if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "torch.jit" in msg:
            deprecated = True
        elif msg not in others:
            others.append(msg)
    return deprecated, others


class ToHalf(Pass):
    """Cast a ``torch.module``'s parameters and buffers to float16 or bfloat16 (``torch.module``).

    One example input of the recipe's shape is run through both models on the CPU: a
    non-finite output (float16 overflows above 65504) fails the pass with a hint to use
    bfloat16; the difference from float32 is reported. Accuracy is checked by ``verify``.
    """

    name = "to_half"
    version = "1"
    inputs = (Slot("model", ("torch.module",)),)
    produces = "torch.module"
    env_packages = ("torch",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "dtype": {"enum": ["float16", "bfloat16"], "default": "float16"},
            "check_finite": {"type": "boolean", "default": True},
        },
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import torch

        model = load_module(inputs["model"])
        dt = getattr(torch, options["dtype"])
        half = copy.deepcopy(model).to(dt).eval()
        x32 = example_inputs(ctx.signature, ctx.signature.inputs[0].shape[0], "float32")
        xh = tuple(x.to(dt) if x.is_floating_point() else x for x in x32)
        with torch.inference_mode():
            ref, out = model(*x32), half(*xh)
        outs = flatten_outputs(out)
        if options["check_finite"] and not all(
            bool(torch.isfinite(o.float()).all()) for o in outs if o.is_floating_point()
        ):
            raise PassError(
                f"to_half: the {options['dtype']} model gives non-finite outputs on an example input "
                "(float16 overflows above 65504; try dtype: bfloat16)"
            )
        diff = max(float((r.float() - o.float()).abs().max()) for r, o in zip(flatten_outputs(ref), outs, strict=True))
        torch.save(half, ctx.workdir / "model.pt")
        nbytes = sum(t.numel() * t.element_size() for t in list(half.parameters()) + list(half.buffers()))
        return PassResult(
            "model.pt",
            metrics={
                "dtype": options["dtype"],
                "weights_mib": round(nbytes / 2**20, 3),
                "max_abs_diff_fp32": diff,
            },
            meta={**inputs["model"].meta, "input_dtype": options["dtype"]},
        )


class _TorchScriptPass(Pass):
    produces = "torchscript"
    inputs = (Slot("model", ("torch.module",)),)
    env_packages = ("torch",)

    def _compile(self, model: Any, example: tuple[Any, ...], options: dict[str, Any]) -> Any:
        raise NotImplementedError

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import torch

        model = load_module(inputs["model"])
        dtype = inputs["model"].meta.get("input_dtype", "float32")
        batch, other = example_batches(ctx.signature)
        example = example_inputs(ctx.signature, batch, dtype)
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            try:
                compiled = self._compile(model, example, options)
            except PassError:
                raise
            except Exception as e:  # TorchScript raises RuntimeError, NotSupportedError, TracingCheckError...
                raise PassError(f"{self.name}: {self.verb} failed: {_first_line(e)}") from e
        deprecated, notes = _split_warnings(caught)
        for n in notes:
            ctx.log.warning("%s: %s", self.name, n)
        path = ctx.workdir / "model.ts"
        with warnings.catch_warnings(record=True) as io_caught:  # torch.jit.save/load are deprecated too
            warnings.simplefilter("always")
            torch.jit.save(compiled, str(path))
            loaded = torch.jit.load(str(path), map_location="cpu").eval()
        deprecated = deprecated or _split_warnings(io_caught)[0]
        checked = [batch]
        with torch.inference_mode():
            diff = compare(model(*example), loaded(*example), options["atol"], options["rtol"], self.name)
            if other is not None:
                x = example_inputs(ctx.signature, other, dtype, seed=1)
                try:
                    got = loaded(*x)
                except Exception as e:
                    raise PassError(
                        f"{self.name}: the saved module fails at batch {other} (the example batch was "
                        f"{batch}; a size baked in as a constant?): {_first_line(e)}"
                    ) from e
                diff = max(
                    diff,
                    compare(model(*x), got, options["atol"], options["rtol"], f"{self.name} at batch {other}"),
                )
                checked.append(other)
        return PassResult(
            "model.ts",
            metrics={
                "deprecated_upstream": deprecated,
                "warnings": len(notes),
                "checked_batches": checked,
                "max_abs_diff": diff,
            },
            meta={**inputs["model"].meta, "input_dtype": dtype, "warnings": notes[:5]},
        )


class Trace(_TorchScriptPass):
    """TorchScript by ``torch.jit.trace`` on an example input (``torchscript``, ``model.ts``).

    Tracing records one path through ``forward``: Python control flow and sizes read as
    Python numbers become constants (a ``TracerWarning`` says so). The saved module is
    therefore run again at a second batch size and compared with the eager model. TorchScript
    is deprecated upstream (``torch.export`` is the successor); the warning is recorded.
    """

    name = "trace"
    version = "1"
    verb = "torch.jit.trace"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "check_trace": {
                "type": "boolean",
                "default": True,
                "description": "torch.jit.trace's own re-trace check.",
            },
            "strict": {
                "type": "boolean",
                "default": True,
                "description": "torch.jit.trace strict mode (refuses mutable containers as outputs).",
            },
            **_CHECK_SCHEMA,
        },
    }

    def _compile(self, model: Any, example: tuple[Any, ...], options: dict[str, Any]) -> Any:
        import torch

        return torch.jit.trace(model, example, check_trace=options["check_trace"], strict=options["strict"])


class Script(_TorchScriptPass):
    """TorchScript by ``torch.jit.script`` (``torchscript``, ``model.ts``): compiles ``forward``'s
    Python source, keeping control flow, so only TorchScript-compatible models pass.
    TorchScript is deprecated upstream; the warning is recorded."""

    name = "script"
    version = "1"
    verb = "torch.jit.script"
    options_schema = {"type": "object", "additionalProperties": False, "properties": dict(_CHECK_SCHEMA)}

    def _compile(self, model: Any, example: tuple[Any, ...], options: dict[str, Any]) -> Any:
        import torch

        return torch.jit.script(model)


class Export(Pass):
    """``torch.export.export`` to an ``ExportedProgram`` saved with ``torch.export.save``
    (``torch.exported``, ``model.pt2``).

    Each dynamic dimension of the recipe becomes ``torch.export.Dim(name, min, max)``; the
    example batch is ``max(2, opt)`` so a dynamic batch is not specialised. The saved program
    is loaded back and compared with the eager model at the example batch and at a second size.
    """

    name = "export"
    version = "1"
    inputs = (Slot("model", ("torch.module",)),)
    produces = "torch.exported"
    env_packages = ("torch",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "strict": {
                "type": "boolean",
                "default": False,
                "description": "Strict (TorchDynamo) tracing instead of the default non-strict mode.",
            },
            **_CHECK_SCHEMA,
        },
    }

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import torch

        model = load_module(inputs["model"])
        dtype = inputs["model"].meta.get("input_dtype", "float32")
        batch, other = example_batches(ctx.signature)
        example = example_inputs(ctx.signature, batch, dtype)
        dyn = tuple(
            {d.axis: torch.export.Dim(d.name, min=d.min, max=d.max) for d in s.dynamic} or None
            for s in ctx.signature.inputs
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(
                    model, example, dynamic_shapes=dyn if any(dyn) else None, strict=options["strict"]
                )
        except Exception as e:  # torch.export raises UserError, GuardOnDataDependentSymNode, ...
            raise PassError(f"export: torch.export.export failed: {_first_line(e)}") from e
        path = ctx.workdir / "model.pt2"
        torch.export.save(ep, str(path))
        loaded = torch.export.load(str(path)).module()
        checked = [batch]
        with torch.inference_mode():
            diff = compare(model(*example), loaded(*example), options["atol"], options["rtol"], "export")
            if other is not None:
                x = example_inputs(ctx.signature, other, dtype, seed=1)
                diff = max(
                    diff,
                    compare(model(*x), loaded(*x), options["atol"], options["rtol"], f"export at batch {other}"),
                )
                checked.append(other)
        return PassResult(
            "model.pt2",
            metrics={"graph_nodes": len(ep.graph.nodes), "checked_batches": checked, "max_abs_diff": diff},
            meta={**inputs["model"].meta, "input_dtype": dtype},
        )


class TorchRunner:
    """A ``torch.module`` (pickled ``nn.Module``), ``torchscript`` or ``torch.exported`` artifact,
    run under ``torch.inference_mode()`` on ``device`` ("cpu" or "cuda")."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if artifact.kind == "torch.module":
            # Our own cache entry, digest-checked before it is opened: a full unpickle is trusted here only.
            with scoped_sys_path(artifact.meta.get("pythonpath", [])):
                model = torch.load(artifact.file, map_location=self.device, weights_only=False)
        elif artifact.kind == "torchscript":
            model = torch.jit.load(str(artifact.file), map_location=self.device)
        elif artifact.kind == "torch.exported":
            model = torch.export.load(str(artifact.file)).module()
            model = model.to(self.device)
        else:
            raise PassError(f"TorchRunner cannot run kind '{artifact.kind}'")
        if hasattr(model, "eval") and artifact.kind != "torch.exported":
            model = model.eval()
        self.model = model
        self.input_names = list(artifact.meta.get("input_names", []))
        self.dtype = getattr(torch, artifact.meta.get("input_dtype", "float32"))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return call_module(self.model, self.input_names or list(feeds), feeds, self.device, self.dtype)


def call_module(
    model: Any, names: list[str], feeds: dict[str, np.ndarray], device: Any, dtype: Any
) -> list[np.ndarray]:
    """``model(*inputs)`` under ``torch.inference_mode()``: ``feeds[name]`` for each of ``names`` in
    order, moved to ``device``, floating inputs cast to ``dtype`` (float16 for a half model; integer
    inputs such as token ids unchanged). Returns every output, flattened, as float32 host arrays
    (the copy to the host waits for the device's work)."""
    import torch

    args = []
    for n in names:
        t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device)
        args.append(t.to(dtype) if t.is_floating_point() else t)
    with torch.inference_mode():
        out = model(*args)
    return [o.detach().float().cpu().numpy() for o in flatten_outputs(out)]

