"""Artifacts: files produced by passes, named by kind and identified by a sha256 digest.

An artifact is a directory (a cache entry) holding one primary file (``main``) and
optionally more. Every kind is declared by a plugin as an :class:`ArtifactKind`
(``accelc_register_artifact_kinds``): how its primary file is checked before a pass's
output is committed, whether a runner can execute it, and whether it belongs to the
device that built it. Kinds declared by the built-in plugins:

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
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20

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


@dataclass(frozen=True)
class ArtifactKind:
    """An artifact kind, as a plugin declares it.

    Attributes:
        name: the kind (``onnx``, ``trt.engine``); pass slots and ``produces`` use it.
        description: what the primary file is, for ``accelc plugins``.
        check: ``check(path) -> None | str``: why the file at ``path`` is not a valid primary
            file of this kind (``None``: it is). Run on every pass output before it is
            committed; it must not execute or unpickle anything. ``None``: no check.
        runnable: a runner can execute it (so ``verify``/``benchmark`` accept it and it can be
            the build's deployable artifact).
        device_bound: executing it needs the target's device (on a CUDA target ``verify`` and
            ``benchmark`` then run it with ``device: cuda`` and need the target's GPU).
        requires: host capabilities needed to *execute* it (added to the nodes that run it).
        missing_hint: appended to the error when a pass needs this kind and nothing makes it
            (e.g. ``" (add data.validation to the recipe)"``).
    """

    name: str
    description: str = ""
    check: Callable[[Path], str | None] | None = None
    runnable: bool = False
    device_bound: bool = False
    requires: tuple[str, ...] = ()
    missing_hint: str = ""

    def problem(self, file: Path) -> str | None:
        """:attr:`check` of ``file``, with an unreadable file reported rather than raised."""
        if self.check is None:
            return None
        try:
            return self.check(file)
        except OSError as e:
            return f"cannot be read: {e}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def npz_problem(file: Path) -> str | None:
    """Check of ``.npz`` kinds: a numpy archive (no pickles)."""
    import numpy as np

    try:
        with np.load(file, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                return "is a single .npy array, not an .npz archive"
    except OSError:
        raise
    except Exception as e:
        return f"is not a numpy .npz archive: {_first_line(e)}"
    return None


def json_problem(file: Path) -> str | None:
    """Check of JSON kinds: UTF-8 JSON."""
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return f"is not JSON: {_first_line(e)}"
    return None


def zip_problem(what: str) -> Callable[[Path], str | None]:
    """Check of zip-container kinds (``torch.save`` and friends); ``what`` names the writers."""

    def check(file: Path) -> str | None:
        return None if zipfile.is_zipfile(file) else f"is not a {what}"

    return check
