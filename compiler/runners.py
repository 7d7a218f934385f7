"""Runners execute any runnable artifact on numpy inputs, so every stage is verified and
benchmarked the same way.

A runner maps ``{input name: ndarray}`` to a list of output arrays (float32 numpy on the
host). Factories register per artifact kind through ``accelc_register_runners``.
"""

from __future__ import annotations

import os
import sys
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


def ort_session(model: str | os.PathLike[str] | bytes, threads: int | None = None, device: str = "cpu") -> Any:
    """An ONNX Runtime ``InferenceSession`` with graph optimizations at ORT_ENABLE_ALL.

    ``threads`` sets ``intra_op_num_threads`` with one inter-op thread (``None``: ORT's default,
    one per physical core). The CUDA execution provider is used for ``device="cuda"`` when the
    installed build has it; CPU otherwise.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)


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
