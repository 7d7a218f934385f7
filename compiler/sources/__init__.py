"""Model and data sources: where a recipe's model and datasets come from.

Sources register through the ``accelc_register_model_sources`` and
``accelc_register_data_sources`` hooks. Each publishes a JSON Schema for its
options (checked when the recipe is validated) and an ``identity`` (cheap facts
that enter the cache key: file digests, package versions) separate from
``load`` (the expensive part), so a warm build never loads the model.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from ..artifacts import sha256_file
from ..errors import DataError, ModelSourceError

#: JSON Schema of a weights reference, shared by the model sources.
WEIGHTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "A state_dict or checkpoint file, loaded with torch.load(weights_only=True).",
    "properties": {
        "file": {"type": "string", "minLength": 1, "description": "Path (relative to the recipe)."},
        "package": {"type": "string", "description": "Python package that ships the file (with 'path')."},
        "path": {"type": "string", "description": "Resource path inside 'package'."},
        "key": {
            "type": "string",
            "description": "Entry of a checkpoint dict holding the state_dict (e.g. state_dict).",
        },
        "strip_prefix": {"type": "string", "description": "Prefix removed from every key (e.g. 'module.')."},
        "strict": {
            "type": "boolean",
            "default": True,
            "description": "Every key of the model and the file must match (load_state_dict strict).",
        },
    },
    "oneOf": [{"required": ["file"]}, {"required": ["package", "path"]}],
}


class ModelSource:
    """Base class of model sources. ``load`` returns an ``nn.Module`` in eval mode."""

    name: ClassVar[str]
    options_schema: ClassVar[dict[str, Any]]
    description: ClassVar[str] = ""
    #: dotted option keys holding paths, resolved against the recipe's directory
    path_options: ClassVar[tuple[str, ...]] = ("weights.file", "path")
    #: the model family this source's models belong to (``transformer``), or ``None``; a target's
    #: ``families`` may give that family its own default pipeline (:meth:`accelc.targets.TargetProfile.pipeline`).
    family: ClassVar[str | None] = None

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        """Facts that change the loaded model: options, weights digest, code version."""
        raise NotImplementedError

    def check(self, options: dict[str, Any]) -> list[tuple[str, str]]:
        """Problems ``accelc validate`` can see without running the user's code: ``[(dotted option
        key, message)]``. ``options`` are validated, with paths absolute. The default checks that
        every path option names an existing file or folder."""
        return missing_paths(options, self.path_options)

    def load(self, options: dict[str, Any]) -> Any:
        """Build the model. Raises :class:`ModelSourceError` naming what failed."""
        raise NotImplementedError


class DataSource:
    """Base class of data sources. ``load`` returns ``{input name: array}`` plus optional ``labels``."""

    name: ClassVar[str]
    options_schema: ClassVar[dict[str, Any]]
    description: ClassVar[str] = ""
    #: dotted option keys holding paths, resolved against the recipe's directory
    path_options: ClassVar[tuple[str, ...]] = ()

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def load(self, options: dict[str, Any], signature: Any) -> dict[str, Any]:
        raise NotImplementedError

    def check(self, options: dict[str, Any]) -> list[tuple[str, str]]:
        """As :meth:`ModelSource.check`: ``[(dotted option key, message)]`` found without loading data."""
        return missing_paths(options, self.path_options)


def option_at(options: dict[str, Any], dotted: str) -> Any:
    """``options["a"]["b"]`` for ``"a.b"``; ``None`` where any level is missing."""
    cur: Any = options
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def missing_paths(options: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[str, str]]:
    """``[(key, "... does not exist")]`` for each path option in ``keys`` that is set and names nothing."""
    out = []
    for key in keys:
        value = option_at(options, key)
        if isinstance(value, str) and not Path(value).exists():
            out.append((key, f"{value} does not exist"))
    return out


def did_you_mean(name: str, known: Any) -> str:
    """``"; did you mean 'x'?"`` with the closest of ``known`` (``difflib.get_close_matches``), or ``""``."""
    import difflib

    close = difflib.get_close_matches(name, [str(k) for k in known], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def resolve_weights_path(weights: dict[str, Any]) -> Path:
    """Absolute path of a weights reference. Raises :class:`ModelSourceError` if it does not exist."""
    if "file" in weights:
        p = Path(weights["file"])
        where = f"model.weights.file ({p})"
    else:
        try:
            p = Path(str(resources.files(weights["package"]).joinpath(weights["path"])))
        except ModuleNotFoundError as e:
            raise ModelSourceError(
                f"model.weights.package: package '{weights['package']}' is not installed"
            ) from e
        where = f"model.weights ({weights['package']}/{weights['path']})"
    if not p.is_file():
        raise ModelSourceError(f"{where}: file not found")
    return p


def weights_identity(weights: dict[str, Any] | None) -> dict[str, Any] | None:
    """sha256 of the weights file plus the loading options (not the path: a moved file is the same file)."""
    if not weights:
        return None
    p = resolve_weights_path(weights)
    return {
        "sha256": sha256_file(p),
        "key": weights.get("key"),
        "strip_prefix": weights.get("strip_prefix"),
        "strict": weights.get("strict", True),
    }


def load_state_dict_into(model: Any, weights: dict[str, Any]) -> None:
    """Load a weights reference into ``model`` with ``torch.load(weights_only=True)``.

    Raises :class:`ModelSourceError` when the file is not a tensor checkpoint (pickles that
    would construct arbitrary objects are refused by ``weights_only``) or keys do not match.
    """
    import torch

    p = resolve_weights_path(weights)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(
            f"model.weights: {p} is not a loadable tensor checkpoint (torch.load weights_only=True): {first}"
        ) from e
    if weights.get("key"):
        if not isinstance(obj, dict) or weights["key"] not in obj:
            raise ModelSourceError(f"model.weights.key: '{weights['key']}' not found in {p}")
        obj = obj[weights["key"]]
    if not isinstance(obj, dict):
        raise ModelSourceError(f"model.weights: {p} holds a {type(obj).__name__}, not a state_dict")
    prefix = weights.get("strip_prefix")
    if prefix:
        obj = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in obj.items()}
    try:
        result = model.load_state_dict(obj, strict=weights.get("strict", True))
    except RuntimeError as e:
        raise ModelSourceError(
            f"model.weights: {p} does not match the model: {str(e).splitlines()[0]}"
        ) from e
    del result


def digest_files(paths: list[Path]) -> str:
    """One sha256 over the names and contents of ``paths`` (in the given order)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


__all__ = [
    "WEIGHTS_SCHEMA",
    "DataError",
    "DataSource",
    "ModelSource",
    "ModelSourceError",
    "did_you_mean",
    "digest_files",
    "load_state_dict_into",
    "resolve_weights_path",
    "weights_identity",
]
