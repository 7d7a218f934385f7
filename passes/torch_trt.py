"""``torch_tensorrt``: Torch-TensorRT (dynamo IR) compilation of a torch model, and its runner.

``torch_tensorrt.compile(module, ir="dynamo", arg_inputs=[torch_tensorrt.Input(min, opt, max)])``
traces the module with ``torch.export``, partitions the graph into TensorRT engines and PyTorch
fallback subgraphs, and returns a ``torch.fx.GraphModule``; ``torch_tensorrt.save(...,
output_format="exported_program")`` writes it as an ``ExportedProgram`` whose engines are embedded
(``tensorrt::execute_engine`` nodes), and ``torch_tensorrt.load(path).module()`` loads it back
(``import torch_tensorrt`` registers the engine op first). The artifact kind is
``torch_tensorrt.exported`` (``model.ep``).

Precision (Torch-TensorRT 2.13/2.14, TensorRT 11, read from their sources and the TensorRT 11
migration guide): every TensorRT 11 network is strongly typed, so the engine's layer types are the
graph's types.

* **FP16**: an FP16 graph (weights cast by ``to_half`` upstream: the default ``torch_tensorrt``
  pipeline), or Torch-TensorRT's autocast of an FP32 graph (option ``autocast: float16``, which
  passes ``enable_autocast=True, autocast_low_precision_type=torch.float16``).
  ``enabled_precisions`` is *not* used: in 2.13/2.14 ``torch_tensorrt.compile`` reads it only for
  the legacy TorchScript/FX frontends and ``torch_tensorrt.dynamo.compile`` no longer takes it
  (pytorch/TensorRT#4099, "Deprecate the enabled_precisions on TRT 11"). On a release whose dynamo
  compiler still takes ``use_explicit_typing`` (TensorRT 10 era) it is set to ``True``, so the
  result means the same there.
* **INT8**: only from a torch graph quantized by NVIDIA ModelOpt (``modelopt.torch.quantization``,
  whose fake-quant ops become ``tensorrt::quantize_op`` nodes that Torch-TensorRT converts to
  TensorRT Q/DQ layers: explicit quantization). An ONNX Q/DQ graph from
  ``onnxruntime.quantization`` (the ``quantize`` pass) cannot feed Torch-TensorRT; it feeds
  ``trt_engine``. accelc has no ModelOpt pass, so no built-in pipeline builds Torch-TensorRT INT8;
  a ModelOpt-quantized ``torch.module`` given to this pass is compiled as it is
  (``modelopt_quantized`` in the metrics).

Nothing here imports ``torch_tensorrt`` at module import time, so the plugin loads on hosts
without it; the pass and the runner raise :class:`~accelc.errors.PassError` saying how to install it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Collection
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.environment import package_version
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot
from accelc.passes.tensorrt import SUPPORTED_TENSORRT, optimization_profile, tensorrt_version, version_ok
from accelc.passes.torch_runtime import call_module, compare, example_batches, example_inputs
from accelc.runners import flatten_outputs
from accelc.signature import InputSignature

#: The file a ``torch_tensorrt.exported`` artifact holds (``torch_tensorrt.save``'s ExportedProgram).
MODEL_FILE = "model.ep"
#: Distributions whose versions change what this pass produces.
TORCH_TENSORRT_DISTS = ("torch", "torch-tensorrt", "tensorrt", "tensorrt-cu12", "tensorrt-cu13")
#: Autocast option -> the ``torch.dtype`` name Torch-TensorRT lowers to.
AUTOCAST_DTYPES = {"float16": "float16", "bfloat16": "bfloat16"}

INSTALL_HINT = (
    "install the GPU extra on a CUDA host (pip install -e '.[gpu]': torch-tensorrt and tensorrt-cu13, "
    "pinned in pyproject.toml; docs/gpu.md)"
)


def import_torch_tensorrt() -> Any:
    """The ``torch_tensorrt`` module. Raises :class:`PassError` naming the import error and the fix."""
    try:
        import torch_tensorrt
    except Exception as e:  # ImportError, or an OSError from a missing libnvinfer
        raise PassError(f"the Python package torch_tensorrt cannot be imported ({type(e).__name__}: {e}); "
                        f"{INSTALL_HINT}") from e
    return torch_tensorrt


def torch_tensorrt_versions() -> dict[str, str | None]:
    """Installed ``torch-tensorrt`` and TensorRT versions (distribution metadata; nothing is imported)."""
    trt = next((v for d in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12") if (v := package_version(d))), None)
    return {"torch_tensorrt": package_version("torch-tensorrt"), "tensorrt": trt}


def input_profiles(signature: InputSignature, float_dtype: str) -> list[dict[str, Any]]:
    """One ``torch_tensorrt.Input`` keyword set per recipe input, in input order.

    ``min_shape``/``opt_shape``/``max_shape`` come from the recipe's dynamic dimensions (the same
    optimization profile ``trt_engine`` builds, :func:`accelc.passes.tensorrt.optimization_profile`);
    ``dtype`` is ``float_dtype`` (e.g. ``"float16"`` after ``to_half``) for floating-point inputs and
    the recipe's dtype otherwise, as a ``torch`` dtype name. No ``name``: Torch-TensorRT matches it
    against ``forward``'s parameter names, which need not be the recipe's input names. When several
    inputs have dynamic axes, ``shared_dims`` maps each to the recipe's dimension name, so inputs that
    share a name (a batch) are exported with one ``torch.export.Dim``.
    """
    import torch

    prof = optimization_profile(signature)
    out = []
    for spec in signature.inputs:
        lo, opt, hi = prof[spec.name]
        is_float = torch.empty(0, dtype=getattr(torch, spec.dtype)).is_floating_point()
        entry: dict[str, Any] = {"min_shape": lo, "opt_shape": opt, "max_shape": hi,
                                 "dtype": float_dtype if is_float else spec.dtype}
        if sum(1 for s in signature.inputs if s.dynamic) > 1 and spec.dynamic:
            entry["shared_dims"] = {d.axis: d.name for d in spec.dynamic}
        out.append(entry)
    return out


def compile_settings(options: dict[str, Any], accepted: Collection[str]) -> dict[str, Any]:
    """Keyword arguments for ``torch_tensorrt.compile(..., ir="dynamo")`` from this pass's options.

    ``accepted`` is the set of parameter names of the installed ``torch_tensorrt.dynamo.compile``
    (its keywords differ between releases). ``workspace_mib`` becomes ``workspace_size`` in bytes,
    ``autocast`` becomes ``enable_autocast``/``autocast_low_precision_type`` (a ``torch.dtype``);
    ``use_explicit_typing=True`` is added where the release still has that switch. No
    ``enabled_precisions``: the dynamo path ignores it from TensorRT 11 on (module docstring).

    Raises :class:`PassError` when an option needs a keyword the installed release lacks (switches that
    are off are dropped instead: off is the library's default).
    """
    import torch

    kw: dict[str, Any] = {
        "workspace_size": options["workspace_mib"] << 20,
        "optimization_level": options["optimization_level"],
        "min_block_size": options["min_block_size"],
        "require_full_compilation": options["require_full_compilation"],
        "use_fp32_acc": options["use_fp32_acc"],
        "hardware_compatible": options["hardware_compatible"],
        "cache_built_engines": False,  # accelc's store is the cache; no engines in Torch-TensorRT's temp dir
        "reuse_cached_engines": False,
    }
    if options["autocast"] != "none":
        kw["enable_autocast"] = True
        kw["autocast_low_precision_type"] = getattr(torch, AUTOCAST_DTYPES[options["autocast"]])
    # a switch left off is Torch-TensorRT's own default: a release without the keyword behaves the same
    missing = sorted(k for k in kw if k not in accepted and kw[k] is not False)
    if missing:
        raise PassError(f"torch_tensorrt: the installed torch_tensorrt.dynamo.compile has no {', '.join(missing)} "
                        f"(needed by these options); use the pinned torch-tensorrt release")
    kw = {k: v for k, v in kw.items() if k in accepted}
    if "use_explicit_typing" in accepted:
        kw["use_explicit_typing"] = True
    return kw


def _load_torch_model(artifact: Artifact, device: str) -> Any:
    """The artifact's model as an ``nn.Module`` on ``device``, in eval mode."""
    import torch

    from accelc.passes.torch_runtime import load_module

    if artifact.kind == "torch.exported":
        return torch.export.load(str(artifact.file)).module().to(device)
    return load_module(artifact).to(device).eval()


def _count_engines(module: Any) -> int:
    return sum(1 for name, _ in module.named_children() if "_run_on_acc" in name)


def _modelopt_quantized(module: Any) -> bool:
    try:
        from torch_tensorrt.dynamo.utils import is_quantized_by_modelopt
    except ImportError:  # an older release without the helper
        return False
    return bool(is_quantized_by_modelopt(module))


class TorchTensorRT(Pass):
    """Compile a torch model with Torch-TensorRT's dynamo IR; save and reload it as an ExportedProgram.

    Input: ``torch.exported`` (``export``'s program, run as its module) or ``torch.module``, moved to
    the GPU. One optimization profile per input from the recipe's dynamic dimensions. The saved
    program is loaded back with ``torch_tensorrt.load`` and must give the compiled module's outputs
    (``atol + rtol * max|out|``) at the example batch and at a second batch size; the difference
    from the source model is reported (``verify`` judges it against the recipe's tolerances).

    Raises ``PassError`` when torch_tensorrt cannot be imported, the installed TensorRT is outside
    ``tensorrt_versions``, compilation fails, or the reloaded program differs.
    """

    name = "torch_tensorrt"
    version = "1"
    inputs = (Slot("model", ("torch.exported", "torch.module")),)
    produces = "torch_tensorrt.exported"
    requires = ("cuda", "tensorrt", "sm>=75")
    env_packages = TORCH_TENSORRT_DISTS
    key_ignores = ("tensorrt_versions",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "autocast": {
                "enum": ["none", *AUTOCAST_DTYPES],
                "default": "none",
                "description": "Torch-TensorRT autocast of an FP32 graph (enable_autocast); 'none': the graph's types.",
            },
            "workspace_mib": {"type": "integer", "minimum": 16, "default": 1024,
                              "description": "TensorRT builder workspace limit (workspace_size), MiB."},
            "optimization_level": {"type": "integer", "minimum": 0, "maximum": 5, "default": 3,
                                   "description": "TensorRT builder optimization level."},
            "min_block_size": {"type": "integer", "minimum": 1, "default": 5,
                               "description": "Fewest contiguous convertible ops that become a TensorRT engine."},
            "require_full_compilation": {"type": "boolean", "default": False,
                                         "description": "Fail instead of leaving ops to PyTorch."},
            "use_fp32_acc": {"type": "boolean", "default": False,
                             "description": "FP32 accumulation for FP16 matmuls."},
            "hardware_compatible": {"type": "boolean", "default": False,
                                    "description": "Engines that run on other GPU architectures (Ampere+)."},
            "atol": {"type": "number", "minimum": 0, "default": 1e-3},
            "rtol": {"type": "number", "minimum": 0, "default": 1e-3},
            "tensorrt_versions": {"type": "string", "default": SUPPORTED_TENSORRT,
                                  "description": "PEP 440 specifier the installed TensorRT must satisfy."},
        },
    }

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        cuda = host.cuda or {}
        return {"gpu": cuda.get("name"), "sm": cuda.get("sm"), "tensorrt": tensorrt_version(host),
                "torch_tensorrt": torch_tensorrt_versions()["torch_tensorrt"]}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        tt = import_torch_tensorrt()
        import torch

        trt_version = tensorrt_version(ctx.host)
        if not version_ok(trt_version, options["tensorrt_versions"]):
            raise PassError(f"torch_tensorrt: TensorRT {trt_version} is outside the versions this target supports "
                            f"({options['tensorrt_versions']})")
        if not torch.cuda.is_available():
            raise PassError("torch_tensorrt: needs a CUDA device; torch sees none")
        src = inputs["model"]
        dtype = src.meta.get("input_dtype", "float32")
        model = _load_torch_model(src, "cuda")
        specs = [tt.Input(**{**p, "dtype": getattr(torch, p["dtype"])}) for p in input_profiles(ctx.signature, dtype)]
        settings = compile_settings(options, set(inspect.signature(tt.dynamo.compile).parameters))
        ctx.progress("compiling with Torch-TensorRT")
        t0 = time.perf_counter()
        try:
            compiled = tt.compile(model, ir="dynamo", arg_inputs=specs, **settings)
        except PassError:
            raise
        except Exception as e:  # Torch-TensorRT raises AssertionError, RuntimeError, UnsupportedOperatorException...
            raise PassError(f"torch_tensorrt: compilation failed: {type(e).__name__}: {_first_line(e)}") from e
        build_s = time.perf_counter() - t0
        path = ctx.workdir / MODEL_FILE
        try:
            tt.save(compiled, str(path), output_format="exported_program", arg_inputs=specs)
            loaded = tt.load(str(path)).module()
        except Exception as e:
            raise PassError(f"torch_tensorrt: save/load of the compiled program failed: {type(e).__name__}: "
                            f"{_first_line(e)}") from e

        batch, other = example_batches(ctx.signature)
        checked, diff, src_diff = [], 0.0, 0.0
        with torch.inference_mode():
            for b, seed in ((batch, 0), (other, 1)):
                if b is None:
                    continue
                x = tuple(t.cuda() for t in example_inputs(ctx.signature, b, dtype, seed=seed))
                ref = compiled(*x)
                diff = max(diff, compare(ref, loaded(*x), options["atol"], options["rtol"],
                                         f"torch_tensorrt (reloaded program at batch {b})"))
                src_diff = max(src_diff, max(float((a.float() - c.float()).abs().max())
                                             for a, c in zip(flatten_outputs(model(*x)), flatten_outputs(ref),
                                                             strict=True)))
                checked.append(b)
        cuda = ctx.host.cuda or {}
        versions = torch_tensorrt_versions()
        metrics = {
            "build_seconds": round(build_s, 3),
            "engines": _count_engines(compiled),
            "model_mib": round(path.stat().st_size / 2**20, 3),
            "checked_batches": checked,
            "max_abs_diff_reloaded": diff,
            "max_abs_diff_source": src_diff,
            "autocast": options["autocast"],
            "modelopt_quantized": _modelopt_quantized(model),
            "torch_tensorrt": versions["torch_tensorrt"] or getattr(tt, "__version__", None),
            "tensorrt": trt_version,
            "gpu": cuda.get("name"),
            "sm": cuda.get("sm"),
        }
        meta = {**src.meta, "input_dtype": dtype, "torch_tensorrt": metrics["torch_tensorrt"],
                "tensorrt": trt_version, "gpu": cuda.get("name"), "sm": cuda.get("sm")}
        return PassResult(MODEL_FILE, metrics=metrics, meta=meta)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class TorchTensorRTRunner:
    """Runner for ``torch_tensorrt.exported`` artifacts: ``torch_tensorrt.load(model.ep).module()`` on
    CUDA; numpy feeds (cast to the artifact's ``input_dtype``) in, float32 numpy outputs out.

    Raises ``PassError`` when torch_tensorrt cannot be imported or there is no CUDA device.
    """

    def __init__(self, artifact: Artifact, device: str = "cuda", threads: int | None = None):
        tt = import_torch_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise PassError("a torch_tensorrt.exported artifact needs a CUDA device; torch sees none")
        self.device = torch.device("cuda")
        self.model = tt.load(str(artifact.file)).module()
        self.input_names = list(artifact.meta.get("input_names", []))
        self.dtype = getattr(torch, artifact.meta.get("input_dtype", "float32"))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return call_module(self.model, self.input_names or list(feeds), feeds, self.device, self.dtype)
