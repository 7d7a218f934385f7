"""Runners execute any runnable artifact on numpy inputs, so every stage is verified and
benchmarked the same way.

A runner maps ``{input name: ndarray}`` to a list of output arrays (float32 numpy on the
host). Factories register per artifact kind through ``accelc_register_runners``.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .artifacts import Artifact
from .errors import PassError


class Runner(Protocol):
    """Executes one artifact. ``input_names`` in model order; ``run`` returns host float arrays."""

    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class RunnerFactory:
    """``make(artifact, device=..., threads=...)`` using the registered factory for the artifact's kind."""

    def __init__(self, factories: dict[str, Any]):
        self.factories = factories

    def make(self, artifact: Artifact, device: str = "cpu", threads: int | None = None) -> Runner:
        f = self.factories.get(artifact.kind)
        if f is None:
            raise PassError(
                f"no runner for artifact kind '{artifact.kind}' (runners: {', '.join(self.factories)})"
            )
        return f(artifact, device=device, threads=threads)


def ort_session(
    model: str | os.PathLike[str] | bytes, threads: int | None = None, device: str = "cpu", providers: Any = None
) -> Any:
    """An ONNX Runtime ``InferenceSession`` with graph optimizations at ORT_ENABLE_ALL.

    ``threads`` sets ``intra_op_num_threads`` with one inter-op thread (``None``: ORT's default,
    one per physical core). ``providers`` (default: :func:`accelc.passes.ort_providers.select_providers`
    for ``device``) is passed as it is: for ``device="cuda"`` the CUDA execution provider when the
    installed build has it, CPU otherwise.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if providers is None:
        from accelc.passes.ort_providers import select_providers

        providers = select_providers(ort.get_available_providers(), device)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)


#: Runtimes that execute an ONNX file (plain or QDQ) directly on the CPU: ONNX Runtime's CPU
#: execution provider, and OpenVINO's CPU plugin reading the file through its ONNX frontend.
ONNX_RUNTIMES = ("onnxruntime", "openvino")

#: ``INFERENCE_PRECISION_HINT`` values accelc passes to OpenVINO's CPU plugin. ``f32`` keeps every
#: float op in float32; without a hint the plugin runs float ops in bf16 on CPUs that have it
#: (AVX512-BF16, AMX), which moves outputs by about 1e-2 relative.
OPENVINO_PRECISIONS = ("f32", "bf16", "f16")


def _openvino() -> Any:
    """The ``openvino`` module. Raises :class:`PassError` saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise PassError("the openvino runtime needs the Python package 'openvino' (pip install openvino)") from e
    return openvino


@functools.cache
def _openvino_core() -> Any:
    """One ``openvino.Core`` for the process, never destroyed. OpenVINO 2026.4's CPU plugin calls
    ``sigaltstack`` on the calling thread when its engine is created and when compiled models
    are destroyed (seen in gdb); with a Core per model, two models released first-in first-out
    left the main thread's alternate signal stack on freed memory. Python's signal
    handlers run on that stack (SA_ONSTACK), so a later Ctrl-C segfaulted instead of raising
    KeyboardInterrupt (tests/test_openvino.py::test_ctrl_c_still_raises_keyboard_interrupt_after_openvino_ran)."""
    return _openvino().Core()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def openvino_compile(model: Any, threads: int | None = None, precision: str = "f32") -> Any:
    """An OpenVINO ``CompiledModel`` on the CPU plugin, set up for batch-1 latency.

    ``model``: a path (``.xml`` IR or ``.onnx``) or an ``openvino.Model``. ``threads`` sets
    ``INFERENCE_NUM_THREADS`` (``None``: the plugin's default, one per physical core);
    ``PERFORMANCE_HINT=LATENCY`` gives one inference stream; ``precision`` is the
    ``INFERENCE_PRECISION_HINT`` (:data:`OPENVINO_PRECISIONS`). Raises :class:`PassError` when
    the ``openvino`` package is missing or the plugin cannot compile the model.
    """
    core = _openvino_core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    src = str(model) if isinstance(model, (str, os.PathLike)) else model
    try:
        return core.compile_model(src, "CPU", config)
    except RuntimeError as e:
        what = src if isinstance(src, str) else "the model"
        raise PassError(f"OpenVINO could not compile {what}: {_first_line(e)}") from e


def openvino_convert(path: str | os.PathLike[str]) -> Any:
    """An ONNX file as an ``openvino.Model`` through ``openvino.convert_model``: the graph the
    ``openvino_ir`` pass saves. Compiling the ONNX file directly takes another route through the
    frontend, whose float rounding can differ (on EfficientNet-Lite0 INT8 it flipped one near-tie
    crop of 96), so whatever scores a model for OpenVINO converts it this way first.
    Raises :class:`PassError` naming the file when the conversion fails."""
    ov = _openvino()
    try:
        return ov.convert_model(str(path))
    except Exception as e:  # the ONNX frontend raises its own OpConversionFailure / RuntimeError types
        raise PassError(f"OpenVINO could not convert {Path(path).name}: {_first_line(e)}") from e


class _OpenVinoSession:
    """One infer request of a compiled model; ``run(feeds)`` copies the outputs out of the
    request's buffers (the next call reuses them)."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in compiled.inputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return [np.array(self.request.get_output_tensor(i).data) for i in range(len(self.compiled.outputs))]


class OnnxSession(Protocol):
    """What :func:`onnx_session` returns: ``run(feeds)`` -> outputs as host arrays."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class _OrtSession:
    def __init__(self, session: Any):
        self.session = session

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self.session.run(None, feeds)]


def onnx_session(
    model: str | os.PathLike[str], threads: int | None = None, runtime: str = "onnxruntime"
) -> OnnxSession:
    """An ONNX file ready to run on the CPU with ``runtime`` (one of :data:`ONNX_RUNTIMES`):
    :func:`ort_session`, or :func:`openvino_convert` then :func:`openvino_compile` with float ops
    kept in f32 (exactly what an ``openvino_ir`` artifact runs).

    Used where a pass scores candidate models on the runtime that will deploy them, since
    the two differ in how they execute INT8 (fusions, requantization rounding).
    Raises ``ValueError`` for another runtime.
    """
    if runtime == "onnxruntime":
        return _OrtSession(ort_session(model, threads))
    if runtime == "openvino":
        return _OpenVinoSession(openvino_compile(openvino_convert(model), threads, "f32"))
    raise ValueError(f"no ONNX runtime '{runtime}' (known: {', '.join(ONNX_RUNTIMES)})")


class OpenVinoRunner:
    """Runs an ``openvino.ir`` artifact (``model.xml`` + ``model.bin``) on OpenVINO's CPU plugin
    with :func:`openvino_compile`, at the inference precision recorded in its metadata."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None):
        if device != "cpu":
            raise PassError(f"an openvino.ir artifact runs on the CPU plugin, not on '{device}'")
        precision = artifact.meta.get("inference_precision", "f32")
        self.session = _OpenVinoSession(openvino_compile(artifact.file, threads, precision))
        self.input_names = self.session.input_names

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(feeds)


class OrtRunner:
    """Runs an ``onnx`` / ``onnx.qdq`` artifact in an :func:`ort_session`."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None):
        self.threads = threads
        self.session = ort_session(artifact.file, threads, device)
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self.session.run(None, feeds)]


def flatten_outputs(out: Any) -> list[Any]:
    """A model's outputs as a flat list: nested tuples/lists in order, dicts by sorted key."""
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten_outputs(out[k])]
    return [out]


class TorchRunner:
    """A ``torch.module`` (pickled ``nn.Module``), ``torchscript`` or ``torch.exported`` artifact,
    run under ``torch.inference_mode()`` on ``device`` ("cpu" or "cuda")."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        for p in artifact.meta.get("pythonpath", []):
            if p not in sys.path:
                sys.path.insert(0, p)
        if artifact.kind == "torch.module":
            # Our own cache entry, digest-checked before it is opened: a full unpickle is trusted here only.
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
        import torch

        names = self.input_names or list(feeds)
        args = []
        for n in names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        with torch.inference_mode():
            out = self.model(*args)
        return [o.detach().float().cpu().numpy() for o in flatten_outputs(out)]


def default_threads() -> int:
    """Threads used when a recipe sets none: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1
