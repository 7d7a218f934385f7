"""Built-in model sources: ``torchvision`` (a torchvision model by name) and ``python``
(any ``module:callable`` returning an ``nn.Module``), each with optional weights."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from ..code_identity import changed_since_first_seen, code_closure
from ..environment import package_version
from ..errors import ModelSourceError, cut
from ..runners import scoped_sys_path
from . import WEIGHTS_SCHEMA, ModelSource, did_you_mean, load_state_dict_into, missing_paths, weights_identity

_COMMON = {
    "source": {"type": "string", "description": "The model source's name."},
    "kwargs": {"type": "object", "description": "Keyword arguments for the constructor."},
    "weights": WEIGHTS_SCHEMA,
    "seed": {
        "type": "integer",
        "minimum": 0,
        "default": 0,
        "description": "torch.manual_seed before construction, so initialised weights are reproducible.",
    },
}


def _finish(model: Any, options: dict[str, Any], what: str) -> Any:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelSourceError(f"model: {what} returned {type(model).__name__}, not a torch.nn.Module")
    if options.get("weights"):
        load_state_dict_into(model, options["weights"])
    return model.eval()


class TorchvisionSource(ModelSource):
    """A ``torchvision.models`` architecture by name (``resnet18``), weights from a local file.

    No weights are downloaded: without ``weights`` the model keeps its seeded initialisation.
    """

    name = "torchvision"
    description = "torchvision.models by name; weights from a local state_dict file, or seeded initialisation"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "name"],
        "properties": {
            **_COMMON,
            "name": {
                "type": "string",
                "pattern": "^[a-z][a-z0-9_]*$",
                "description": "A name from torchvision.models.list_models(), e.g. resnet18, mobilenet_v3_small.",
            },
        },
    }

    def check(self, options: dict[str, Any]) -> list[tuple[str, str]]:
        """The weights file exists and torchvision has a model of that name (``list_models()``)."""
        import torchvision

        out = missing_paths(options, self.path_options)
        known = torchvision.models.list_models()
        if options["name"] not in known:
            out.append(("name", f"torchvision has no model '{options['name']}'{did_you_mean(options['name'], known)}"))
        return out

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "torchvision": package_version("torchvision"),
            "name": options["name"],
            "kwargs": options.get("kwargs", {}),
            "weights": weights_identity(options.get("weights")),
            "seed": options.get("seed", 0),
        }

    def load(self, options: dict[str, Any]) -> Any:
        import torch
        import torchvision

        kwargs = dict(options.get("kwargs", {}))
        if kwargs.get("weights") not in (None, False):
            raise ModelSourceError(
                "model.kwargs.weights: torchvision would download pretrained weights, and accelc never "
                "downloads; save a state_dict and name it under model.weights.file instead"
            )
        kwargs["weights"] = None
        try:
            builder = torchvision.models.get_model_builder(options["name"])
        except ValueError as e:
            raise ModelSourceError(f"model.name: torchvision has no model '{options['name']}'") from e
        torch.manual_seed(options.get("seed", 0))
        try:
            model = builder(**kwargs)
        except TypeError as e:
            raise ModelSourceError(f"model.kwargs: {e}") from e
        return _finish(model, options, f"torchvision.models.{options['name']}")


class PythonSource(ModelSource):
    """Any callable ``"package.module:attr.path"`` that returns an ``nn.Module``.

    ``path`` (relative to the recipe) is put on ``sys.path`` first, for models defined
    next to the recipe. The code's identity in the cache key is its code closure
    (:mod:`accelc.code_identity`): the sha256 of the callable's module and of every local
    (not installed) module it imports, transitively, plus the versions of the installed
    distributions they import (and of the module's own, if it is installed).
    """

    name = "python"
    description = "any 'module:callable' returning an nn.Module, with kwargs and optional weights"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "callable"],
        "properties": {
            **_COMMON,
            "callable": {
                "type": "string",
                "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
                "description": "'module:attribute' of a function or class returning the nn.Module, e.g. "
                "'my_model:build' for build() in my_model.py.",
            },
            "path": {
                "type": "string",
                "description": "Folder holding the model's module, put on sys.path first (relative to the "
                "recipe); write '.' for a model file next to the recipe.",
            },
        },
    }

    def check(self, options: dict[str, Any]) -> list[tuple[str, str]]:
        """``path`` is a folder, the module is found there or on ``sys.path`` (located with
        ``importlib.machinery.PathFinder``, so no package ``__init__`` runs), and, for a module
        that is a source file, the callable's first name is defined at its top level (read with
        ``ast``, not imported)."""
        out = missing_paths(options, self.path_options)
        if options.get("path") and Path(options["path"]).exists() and not Path(options["path"]).is_dir():
            out.append(("path", f"{options['path']} is not a folder"))
        mod, attr = options["callable"].split(":", 1)
        search = [options["path"]] if options.get("path") else []
        origin = find_module_file(mod, search)
        if origin is None:
            where = f"{options['path']} and sys.path" if options.get("path") else "sys.path"
            hint = "" if options.get("path") else "; a module next to the recipe needs model.path: ."
            out.append(("callable", f"module '{mod}' not found (looked in {where}){hint}"))
        elif origin.suffix == ".py":
            names = top_level_names(origin)
            first = attr.split(".")[0]
            if names is not None and first not in names:
                out.append(
                    ("callable", f"{origin} defines no '{first}'{did_you_mean(first, sorted(names))}")
                )
        return out

    @staticmethod
    def _module_file(options: dict[str, Any]) -> Path:
        mod = options["callable"].split(":", 1)[0]
        with scoped_sys_path(options.get("path")):
            try:
                spec = importlib.util.find_spec(mod)
            except (ModuleNotFoundError, ValueError):
                spec = None
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            where = f" (looked in {options['path']} and sys.path)" if options.get("path") else ""
            raise ModelSourceError(f"model.callable: module '{cut(mod)}' not found{cut(where)}")
        return Path(spec.origin)

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        mod = options["callable"].split(":", 1)[0]
        self._module_file(options)  # a clear error when the module is missing
        search = [options["path"]] if options.get("path") else []
        try:
            closure = code_closure(mod, search=search)
        except ModuleNotFoundError as e:
            raise ModelSourceError(f"model.callable: module '{cut(mod)}' not found") from e
        return {
            "callable": options["callable"],
            "code_sha256": closure.digest(),
            "modules": closure.modules,
            "distributions": closure.distributions,
            "kwargs": options.get("kwargs", {}),
            "weights": weights_identity(options.get("weights")),
            "seed": options.get("seed", 0),
        }

    def load(self, options: dict[str, Any]) -> Any:
        import torch

        mod_name, attr = options["callable"].split(":", 1)
        self._module_file(options)
        search = [options["path"]] if options.get("path") else []
        stale = changed_since_first_seen(code_closure(mod_name, search=search).modules)
        if stale:  # Python would run the copies imported earlier, not the code the cache key describes
            raise ModelSourceError(
                f"model.callable: {cut(', '.join(stale))} changed on disk after this process imported it; "
                "run the build in a new process (e.g. `accelc build`)"
            )
        with scoped_sys_path(options.get("path")):
            try:
                obj: Any = importlib.import_module(mod_name)
            except Exception as e:
                raise ModelSourceError(f"model.callable: importing '{mod_name}' failed: {e}") from e
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ModelSourceError(f"model.callable: '{options['callable']}' has no attribute '{part}'")
            obj = getattr(obj, part)
        torch.manual_seed(options.get("seed", 0))
        try:
            model = obj(**options.get("kwargs", {}))
        except Exception as e:
            raise ModelSourceError(
                f"model.callable: {options['callable']}(...) raised {type(e).__name__}: {e}"
            ) from e
        return _finish(model, options, options["callable"])


def find_module_file(module: str, search: list[str]) -> Path | None:
    """The file of ``module`` (dotted) found in ``search`` then ``sys.path``, without importing anything
    (``importlib.machinery.PathFinder`` walks the packages' folders), or ``None``."""
    import sys
    from importlib.machinery import PathFinder

    locations: list[str] | None = [*search, *sys.path]
    spec = None
    for part in module.split("."):
        if locations is None:
            return None
        try:
            spec = PathFinder.find_spec(part, locations)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        locations = list(spec.submodule_search_locations) if spec.submodule_search_locations else None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return None
    return Path(spec.origin)


def top_level_names(file: Path) -> set[str] | None:
    """Names a Python source file binds at its top level (defs, classes, assignments, imports), or
    ``None`` when that cannot be told without running it (unparsable, ``import *``, ``__getattr__``)."""
    import ast

    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    names: set[str] = set()

    def bind(body: list[Any]) -> bool:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    if a.name == "*":
                        return False
                    names.add((a.asname or a.name).split(".")[0])
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                # a conditional definition counts as one
                parts = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
                parts += [h.body for h in getattr(node, "handlers", [])]
                if not all(bind(p) for p in parts):
                    return False
        return True

    if not bind(tree.body):
        return None
    return None if "__getattr__" in names else names
