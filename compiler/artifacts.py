"""Artifacts: files produced by passes, named by kind and identified by a sha256 digest.

An artifact is a directory (a cache entry) holding one primary file (``main``) and
optionally more. Kinds used by the built-in passes:

==================== ===========================================================
kind                 primary file
==================== ===========================================================
torch.module         ``model.pt``: ``torch.save`` of an ``nn.Module`` in eval mode
onnx                 ``model.onnx``: float graph
onnx.qdq             ``model.onnx``: graph with QuantizeLinear/DequantizeLinear pairs
onnx.dynamic         ``model.onnx``: dynamic INT8 (MatMulInteger, QAttention, DynamicQuantizeLSTM)
calibration.table    ``calibration.json``: ONNX Runtime ``TensorsData`` (per-tensor ranges)
calibration.data     ``data.npz``: preprocessed calibration inputs
validation.data      ``data.npz``: preprocessed validation inputs (+ optional labels)
reference.outputs    ``outputs.npz``: source-model outputs on the validation inputs
verification.report  ``metrics.json``
benchmark.report     ``metrics.json``
torchscript          ``model.ts``
torch.exported       ``model.pt2``
trt.engine           ``model.engine``: serialized TensorRT engine
trt.timing_cache     ``timing.cache``: serialized TensorRT timing cache (empty: no timings yet)
runtime.config       ``runtime.json``: how the loader rebuilds the runtime (CUDA graphs, ...)
==================== ===========================================================
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20

#: Kinds a runner can execute on sample inputs (so they can be verified and benchmarked).
RUNNABLE_KINDS: tuple[str, ...] = (
    "torch.module",
    "torchscript",
    "torch.exported",
    "onnx",
    "onnx.qdq",
    "onnx.dynamic",
    "openvino.ir",
    "trt.engine",
    "runtime.config",
)
#: Kinds that record measurements rather than a deployable model.
REPORT_KINDS: tuple[str, ...] = ("verification.report", "benchmark.report")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Map every regular file under ``root`` (posix relative path) to its sha256, sorted by path."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def tree_digest(files: dict[str, str]) -> str:
    """One sha256 over a ``{relative path: sha256}`` map (order-independent)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(files[rel].encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A pass output stored in the content-addressed store.

    ``path`` is the entry directory, ``main`` the primary file's name inside it,
    ``digest`` the sha256 tree digest over the entry's payload files, ``meta`` what
    the producing pass recorded (input names, metrics, ...).
    """

    kind: str
    path: Path
    main: str
    digest: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        """Absolute path of the primary file."""
        return self.path / self.main
