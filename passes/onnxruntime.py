"""ONNX Runtime: the ``onnxruntime`` runtime's runner (``onnx`` / ``onnx.qdq`` artifacts) and its
session factory for trials (calibrate's method search, quantize's fallback search, bias correction).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from accelc.artifacts import Artifact


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


class OrtSession:
    """One ``InferenceSession`` as an :class:`accelc.runners.Session`: ``input_names`` and
    ``input_shapes`` (ints, or names of dynamic axes) in model order, ``run(feeds)`` -> host arrays."""

    def __init__(self, session: Any):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.input_shapes = [list(i.shape) for i in session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self.session.run(None, feeds)]


def ort_trial_session(model: str | os.PathLike[str] | bytes, threads: int | None = None) -> OrtSession:
    """The ``onnxruntime`` runtime's session factory: :func:`ort_session` on the CPU provider."""
    return OrtSession(ort_session(model, threads))


class OrtRunner:
    """Runs an ``onnx`` / ``onnx.qdq`` artifact in an :func:`ort_session`."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None):
        self.threads = threads
        self.session = ort_session(artifact.file, threads, device)
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self.session.run(None, feeds)]

