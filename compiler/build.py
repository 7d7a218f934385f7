"""The build pipeline as a library: recipe -> graph -> plan -> execute -> out dir.

``accelc build`` and ``accelc plan`` are thin wrappers around :func:`build` and :func:`plan`.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import Store, default_root
from .errors import AccelcError
from .executor import BuildResult, Executor, PlannedNode, Reporter, copy_artifact
from .graph import PassGraph, lower
from .host import Host
from .recipe import load_recipe
from .registry import default_registry
from .report import build_lock, build_report, read_lock, write_outputs


@dataclass
class BuildOutcome:
    """What ``build`` produced: the report document, the out dir, and the error that stopped it (if any)."""

    report: dict[str, Any]
    out_dir: Path
    result: BuildResult

    @property
    def ok(self) -> bool:
        return self.result.failure is None


def prepare(recipe_path: str | Path, target: str | None = None, registry: Any = None) -> tuple[PassGraph, Any]:
    """Validate the recipe and lower it. Raises ``RecipeError`` or ``GraphError``."""
    registry = registry or default_registry()
    recipe = load_recipe(recipe_path, registry, target_override=target)
    return lower(recipe, registry), registry


def default_out_dir(graph: PassGraph) -> Path:
    return Path("build") / graph.recipe.name


def plan(
    recipe_path: str | Path,
    target: str | None = None,
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    host: Host | None = None,
    registry: Any = None,
) -> tuple[PassGraph, list[PlannedNode]]:
    """The graph and each node's key and status, with reasons relative to the out dir's last lock."""
    graph, registry = prepare(recipe_path, target, registry)
    store = Store(cache_dir or default_root())
    ex = Executor(graph, registry, store, host or Host())
    previous = read_lock(Path(out_dir) if out_dir else default_out_dir(graph))
    return graph, ex.plan(previous)


def build(
    recipe_path: str | Path,
    target: str | None = None,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    no_cache: bool = False,
    reporter: Reporter | None = None,
    host: Host | None = None,
    registry: Any = None,
) -> BuildOutcome:
    """Build a recipe. The out dir gets the final artifact, ``report.json``, ``report.md`` and
    ``accelc.lock``; on failure it gets the reports (status ``failed``) and no artifact.

    With ``no_cache`` the build uses a private, temporary store: nothing is read from or
    written to the shared cache.

    Raises:
        RecipeError, GraphError: before anything runs. Build failures (a pass error, a missed
        tolerance, a missing capability) do not raise: they are in ``outcome.result.failure``.
    """
    graph, registry = prepare(recipe_path, target, registry)
    out = Path(out_dir) if out_dir else default_out_dir(graph)
    out.mkdir(parents=True, exist_ok=True)
    tmp_store = Path(tempfile.mkdtemp(prefix="accelc-nocache-")) if no_cache else None
    try:
        store = Store(tmp_store or cache_dir or default_root())
        ex = Executor(graph, registry, store, host or Host(), reporter)
        previous = read_lock(out)
        result = ex.build()
        files: list[str] = []
        stale = (previous or {}).get("final", {}).get("files", [])
        if result.final is not None:
            files = copy_artifact(result.final, out)
        for name in stale:  # a previous build's deliverable that this build did not replace
            if name not in files and (out / name).is_file():
                (out / name).unlink()
        report = build_report(ex, result, files)
        write_outputs(out, report, build_lock(ex, result, report))
        return BuildOutcome(report, out, result)
    finally:
        if tmp_store is not None:
            shutil.rmtree(tmp_store, ignore_errors=True)


__all__ = ["AccelcError", "BuildOutcome", "build", "plan", "prepare"]
