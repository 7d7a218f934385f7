"""The build pipeline as a library: recipe -> graph -> plan -> execute -> out dir.

``accelc build`` and ``accelc plan`` are thin wrappers around :func:`build` and :func:`plan`.

Publishing into the out dir is serialised by a lock file (``.accelc-out.lock``) so that
concurrent builds into one out dir never interleave; the previous ``accelc.lock`` is
removed before the new artifact is copied in and the new one is written last, so an out
dir whose lock file is present always describes the files next to it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .cache import Store, default_root, is_no_space, size_limit_from_env
from .deploy import DEPLOY_NAME, deploy_manifest
from .errors import AccelcError
from .executor import BuildResult, Executor, PlannedNode, Reporter, copy_artifact
from .graph import PassGraph, lower
from .host import Host
from .recipe import load_recipe
from .registry import default_registry
from .report import LOCK_NAME, build_lock, build_report, read_lock, write_outputs

#: Lock file inside an out dir, held while a build publishes its artifact and reports there.
OUT_LOCK = ".accelc-out.lock"
#: Report files a build writes into its out dir (:mod:`accelc.report`).
REPORT_FILES = ("report.json", "report.md", LOCK_NAME, DEPLOY_NAME)


class OutputError(AccelcError):
    """The out dir cannot be written (disk full, permissions); nothing half-written is left there."""

    exit_code = 6


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
    cache_url: str | None = None,
) -> tuple[PassGraph, list[PlannedNode]]:
    """The graph and each node's key and status, with reasons relative to the out dir's last lock.
    With ``cache_url`` an entry on the remote cache counts as cached (nothing is downloaded)."""
    graph, registry = prepare(recipe_path, target, registry)
    store = _open_store(cache_dir or default_root(), cache_url, None, download=False)
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
    cache_max_bytes: int | None = None,
    cache_url: str | None = None,
) -> BuildOutcome:
    """Build a recipe. The out dir gets the final artifact, ``report.json``, ``report.md`` and
    ``accelc.lock``; on failure it gets the reports (status ``failed``) and no artifact.

    With ``no_cache`` the build uses a private, temporary store: nothing is read from or
    written to the shared cache. ``cache_max_bytes`` (default: ``$ACCELC_CACHE_MAX_MIB``)
    bounds the shared store: after the build, least-recently-used entries are evicted until
    it fits, never the ones this build used. ``cache_url`` (an fsspec URL, see
    :mod:`accelc.remote`) puts a shared remote cache behind the local one; ``no_cache`` ignores it.

    Raises:
        RecipeError, GraphError: before anything runs. DataError, ModelSourceError: a source
        cannot compute its identity (missing or empty data folder, missing weights file),
        before anything runs. CacheError: the store is unusable. OutputError: the out dir
        cannot be written. Build failures (a pass error, a missed tolerance, a missing
        capability, a full disk while a pass writes) do not raise: they are in
        ``outcome.result.failure``.
    """
    graph, registry = prepare(recipe_path, target, registry)
    out = Path(out_dir) if out_dir else default_out_dir(graph)
    limit = None if no_cache else (cache_max_bytes if cache_max_bytes is not None else size_limit_from_env())
    tmp_store: Path | None = None
    try:
        if no_cache:
            try:
                tmp_store = Path(tempfile.mkdtemp(prefix="accelc-nocache-"))
            except OSError as e:
                raise OutputError(f"cannot create a private store for --no-cache: {e}") from e
        store = _open_store(tmp_store or cache_dir or default_root(), None if no_cache else cache_url, reporter)
        ex = Executor(graph, registry, store, host or Host(), reporter)  # source identities: may raise
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create out dir {out}: {e.strerror or e}") from e
        result = ex.build()
        report = _publish(ex, result, out)
        if limit is not None:
            store.gc(limit, keep={ex.key(n.id) for n in graph.nodes})
        return BuildOutcome(report, out, result)
    finally:
        if tmp_store is not None:
            shutil.rmtree(tmp_store, ignore_errors=True)


def _publish(ex: Executor, result: BuildResult, out: Path) -> dict[str, Any]:
    """Copy the final artifact (checked against its digests) and write the reports, under the out dir's lock."""
    try:
        with FileLock(str(out / OUT_LOCK)):
            previous = read_lock(out)
            (out / LOCK_NAME).unlink(missing_ok=True)  # the old lock must not describe the new files
            files: list[str] = []
            if result.final is not None:
                info = ex.store.lookup(ex.key(ex.graph.final))
                expected = info.meta.get("files") if info is not None else None
                try:
                    files = copy_artifact(result.final, out, expected)
                except AccelcError as e:
                    result.final, result.failure = None, e
            stale = (previous or {}).get("final", {}).get("files", [])
            for name in stale:  # a previous build's deliverable that this build did not replace
                if name not in files and (out / name).is_file():
                    (out / name).unlink()
            report = build_report(ex, result, files)
            report.update(_remote_section(ex.store))
            write_outputs(out, report, build_lock(ex, result, report), deploy_manifest(ex, result, report))
            return report
    except OSError as e:
        for name in REPORT_FILES:
            (out / f".{name}.tmp").unlink(missing_ok=True)  # accelc.report's temporary names
        what = "disk full" if is_no_space(e) else (e.strerror or str(e))
        raise OutputError(f"cannot write the build's outputs into {out}: {what}; no lock file was left there") from e


# -- remote cache seam (accelc.remote; fsspec is imported only when a URL is given) ------------
def _open_store(root: str | Path, cache_url: str | None, reporter: Reporter | None, download: bool = True) -> Store:
    if not cache_url:
        return Store(root)
    from .remote import open_store

    return open_store(root, cache_url, notice=reporter.notice if reporter else None, download=download)


def _remote_section(store: Store) -> dict[str, Any]:
    """``{"remote_cache": {url, remote_hits, uploads, refused}}`` for a tiered store (the URL without
    credentials), else nothing."""
    remote = getattr(store, "remote", None)
    if remote is None:
        return {}
    from .remote import display_url

    return {"remote_cache": {"url": display_url(remote.url), **store.stats}}  # type: ignore[attr-defined]


__all__ = ["AccelcError", "BuildOutcome", "OutputError", "build", "plan", "prepare"]
