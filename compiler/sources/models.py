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
from . import WEIGHTS_SCHEMA, ModelSource, load_state_dict_into, weights_identity

_COMMON = {
    "source": {"type": "string"},
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
        "properties": {**_COMMON, "name": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"}},
    }

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
            "callable": {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"},
            "path": {
                "type": "string",
                "description": "Directory added to sys.path (relative to the recipe).",
            },
        },
    }

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
