"""The variants ``benchmarks.compare`` times: each as a callable ``{input name: array} -> first output``
(float32 numpy), built in the worker process that measures it (:func:`serve_call`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class Skip(Exception):
    """A variant that cannot run here (e.g. no CUDA execution provider); the message says why."""


# --- the variants as callables: {input name: array} -> first output as a float32 numpy array -----------


class TorchCall:
    """An ``nn.Module`` (eager or ``torch.compile``d) called under ``torch.inference_mode()``."""

    def __init__(self, model: Any, names: list[str], device: str):
        self.model, self.names, self.device = model, names, device

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        args = [torch.from_numpy(feeds[n]).to(self.device) for n in self.names]
        with torch.inference_mode():
            out = self.model(*args)
        while isinstance(out, (list, tuple)):
            out = out[0]
        return out.float().cpu().numpy()


def ort_session_options(threads: int) -> Any:
    """The session options every ONNX Runtime variant gets (the same as accelc's ``OrtRunner``):
    all graph optimizations (ORT's default), ``threads`` intra-op threads, one inter-op thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def ort_providers(device: str) -> list[str]:
    """Execution providers for ``device``. Raises :class:`Skip` for CUDA without the CUDA EP."""
    import onnxruntime as ort

    if device != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip("the installed onnxruntime has no CUDAExecutionProvider")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OrtCall:
    """An ONNX file in an ``InferenceSession`` with :func:`ort_session_options`."""

    def __init__(self, path: str, threads: int, device: str, profile_prefix: str | None = None):
        import onnxruntime as ort

        so = ort_session_options(threads)
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        self.session = ort.InferenceSession(path, so, providers=ort_providers(device))

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run(None, feeds)[0])


class OpenVinoCall:
    """An ONNX file compiled by OpenVINO's CPU plugin the way a user would: ``compile_model(path,
    "CPU")`` with only the thread count and the ``LATENCY`` hint set. The inference precision is
    left at the plugin's default, which on CPUs with bf16 support (AVX512-BF16, AMX) runs float
    ops in bf16: the quality columns show what that costs. ``precision`` sets
    ``INFERENCE_PRECISION_HINT`` (profiling an accelc IR at its recorded precision); ``profile``
    turns on the per-layer counters (``PERF_COUNT``) read by :func:`benchmarks.profiling.profile_variant`."""

    def __init__(
        self, path: str, threads: int, device: str, precision: str | None = None, profile: bool = False
    ):
        if device != "cpu":
            raise Skip("OpenVINO's CPU plugin runs on the CPU only")
        try:
            import openvino as ov
        except ImportError as e:
            raise Skip("the openvino package is not installed") from e
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        if profile:
            config["PERF_COUNT"] = True
        compiled = ov.Core().compile_model(path, "CPU", config)
        self.request = compiled.create_infer_request()

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        self.request.infer(feeds)
        return np.array(self.request.get_output_tensor(0).data)


class AccelcCall:
    """accelc's artifact through accelc's own runner for its kind (``OrtRunner`` for ONNX)."""

    def __init__(self, artifact: dict[str, Any], threads: int, device: str):
        from accelc.artifacts import Artifact
        from accelc.registry import default_registry
        from accelc.runners import RunnerFactory

        art = Artifact(
            kind=artifact["kind"],
            path=Path(artifact["path"]),
            main=artifact["main"],
            digest=artifact["digest"],
            meta=artifact.get("meta", {}),
        )
        self.runner = RunnerFactory(default_registry().runners).make(art, device=device, threads=threads)

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.runner.run(feeds)[0], dtype=np.float32)


def load_model(recipe: Any) -> Any:
    """The recipe's source model (eval mode), loaded through its model source, as the build does."""
    from accelc.registry import default_registry

    reg = default_registry()
    return reg.model_sources[recipe.model["source"]].load(recipe.model)


def make_call(variant: str, spec: dict[str, Any], recipe: Any, model: Any = None) -> Callable[..., np.ndarray]:
    """The callable for ``variant`` from the prepared files named in ``spec``.
    Raises :class:`Skip` when the variant cannot run here."""
    device, threads = spec["device"], spec["threads"]
    if variant in ("eager", "compile"):
        import torch

        torch.set_num_threads(threads)
        model = model if model is not None else load_model(recipe)
        model = model.to(device)
        if variant == "compile":
            model = torch.compile(model)
        return TorchCall(model, recipe.signature.names, device)
    if variant in ("ort_fp32", "ort_int8_qs"):
        path = spec.get(variant)
        if not path:
            raise Skip(spec.get(f"{variant}_reason", "not prepared"))
        return OrtCall(path, threads, device)
    if variant == "ov_fp32":
        if not spec.get("ort_fp32"):  # the same default export
            raise Skip(spec.get("ort_fp32_reason", "not prepared"))
        return OpenVinoCall(spec["ort_fp32"], threads, device)
    if variant == "accelc":
        if not spec.get("accelc"):
            raise Skip(spec.get("accelc_reason", "no artifact"))
        return AccelcCall(spec["accelc"], threads, device)
    raise ValueError(f"unknown variant {variant!r}")


def serve_call(variant: str, spec: dict[str, Any]) -> Callable[..., np.ndarray]:
    """The ``serve`` worker's factory (``benchmarks.workers``): :func:`make_call` for ``variant``.
    Only the torch variants load the recipe named by ``spec["recipe"]`` (loading a torchvision
    recipe imports torch), so the ONNX Runtime and OpenVINO workers hold what a deployment of
    that runtime holds and their peak memory is theirs. Raises :class:`Skip`."""
    if variant not in ("eager", "compile"):
        return make_call(variant, spec, recipe=None)
    from accelc.recipe import load_recipe
    from accelc.registry import default_registry

    return make_call(variant, spec, load_recipe(spec["recipe"], default_registry()))


def time_block(call: Callable[..., Any], feeds: dict[str, np.ndarray], warmup: int, iterations: int) -> list[float]:
    """``warmup`` untimed calls, then ``iterations`` calls each timed with ``perf_counter`` (s)."""
    for _ in range(warmup):
        call(feeds)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        call(feeds)
        times.append(time.perf_counter() - t0)
    return times
