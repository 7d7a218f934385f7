"""The build pipeline as a library: recipe -> graph -> plan -> execute -> out dir.

``accelc build`` and ``accelc plan`` are thin wrappers around :func:`build` and :func:`plan`.

Out dir layout and ownership. Each publish writes a complete *generation* (the final
artifact's files, ``report.json``, ``report.md``, ``accelc.lock``) into
``<out>/.accelc/generations/<id>/`` and then switches one pointer, the symlink
``<out>/.accelc/current``, with a single ``rename``. The top-level names (``model.onnx``,
``report.json``...) are symlinks ``.accelc/current/<name>``, so at every instant each of them
shows the current generation's file (or nothing), never a mix of two builds; a reader that
needs several files from one generation resolves ``.accelc/current`` once. A build killed at
any point leaves the previous generation current; the next publish sweeps unfinished
generations and temporary files. accelc only ever removes what its publishing wrote: its
links (plain names whose link text is ``.accelc/current/<name>``), generation directories
inside ``.accelc/generations/``, its temporary names, and the plain files of an out dir an
earlier accelc version published (trusted only when their digests match that version's
``accelc.lock``). It never removes a path named by a lock file's contents. A name it would
publish that holds anything else is the user's: the build refuses (exit 2, naming the
files) unless ``force``. Publishing is serialised by ``.accelc-out.lock``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .artifacts import sha256_file, tree_digest
from .cache import Store, default_root, is_no_space, safe_relative, size_limit_from_env
from .deploy import DEPLOY_NAME, deploy_manifest
from .errors import AccelcError, LockTimeoutError, OutDirError
from .executor import (
    DEFAULT_LOCK_TIMEOUT_S,
    DEFAULT_USER_CODE_TIMEOUT_S,
    BuildResult,
    Executor,
    PlannedNode,
    Reporter,
    copy_artifact,
)
from .graph import PassGraph, lower
from .host import Host
from .plots import PLOT_FILES
from .recipe import load_recipe
from .registry import default_registry
from .report import LOCK_NAME, build_lock, build_report, read_lock, write_outputs

#: Lock file inside an out dir, held while a build publishes its artifact and reports there.
OUT_LOCK = ".accelc-out.lock"
#: Report files a build writes into its out dir (:mod:`accelc.report`).
REPORT_FILES = ("report.json", "report.md", LOCK_NAME, DEPLOY_NAME, *PLOT_FILES)
#: accelc's own directory inside an out dir: ``generations/<id>/`` and the ``current`` pointer.
META_DIR = ".accelc"
#: Names of generation directories (``g<ns hex>-<pid>-<random>``); nothing else there is removed.
GENERATION_NAME = re.compile(r"g[0-9a-f]+-[0-9]+-[0-9a-f]{8}")
#: Temporary names accelc writes at the top level (links being placed; files of earlier versions).
LEGACY_TMP_NAME = re.compile(r"\.[^/]+\.[0-9]+\.[0-9a-f]{8}\.tmp|\.(report\.json|report\.md|accelc\.lock)\.tmp")


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
    force: bool = False,
    user_code_timeout: float | None = DEFAULT_USER_CODE_TIMEOUT_S,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT_S,
) -> BuildOutcome:
    """Build a recipe. The out dir gets the final artifact, ``report.json``, ``report.md`` and
    ``accelc.lock`` as one new generation (see the module docstring); on failure it gets the
    reports (status ``failed``) and no artifact.

    With ``no_cache`` the build uses a private, temporary store under the cache root's
    ``scratch/`` (so ``accelc cache gc`` reclaims it if the build is killed): nothing is read
    from or written to the shared entries. ``cache_max_bytes`` (default: ``$ACCELC_CACHE_MAX_MIB``)
    bounds the shared store: after the build, least-recently-used entries are evicted until
    it fits, never the ones this build used. ``cache_url`` (an fsspec URL, see
    :mod:`accelc.remote`) puts a shared remote cache behind the local one; ``no_cache`` ignores it.
    ``force`` lets the build replace files at the names it publishes that accelc did not write.
    ``user_code_timeout`` (seconds, ``None``: no limit) bounds a model source's ``load`` (the
    user's callable); ``lock_timeout`` bounds each wait for another build's lock on a cache key.

    Raises:
        RecipeError, GraphError: before anything runs. DataError, ModelSourceError: a source
        cannot compute its identity (missing or empty data folder, missing weights file),
        before anything runs. OutDirError: the out dir is a filesystem root or the home
        directory, or holds files accelc did not write at names it publishes (without
        ``force``). CacheError: the store is unusable. OutputError: the out dir cannot be
        written. Build failures (a pass error, a missed tolerance, a missing capability, a
        full disk while a pass writes, a timeout) do not raise: they are in ``outcome.result.failure``.
    """
    graph, registry = prepare(recipe_path, target, registry)
    out = Path(out_dir) if out_dir else default_out_dir(graph)
    check_out_dir(out)
    limit = None if no_cache else (cache_max_bytes if cache_max_bytes is not None else size_limit_from_env())
    shared = Store(cache_dir or default_root())
    with contextlib.ExitStack() as stack:
        if no_cache:
            try:
                store = Store(stack.enter_context(shared.scratch("nocache")))
            except OSError as e:
                raise OutputError(f"cannot create a private store for --no-cache: {e}") from e
        else:
            store = _open_store(shared.root, cache_url, reporter) if cache_url else shared
        ex = Executor(  # source identities: may raise
            graph, registry, store, host or Host(), reporter,
            user_code_timeout=user_code_timeout, lock_timeout=lock_timeout,
        )
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create out dir {out}: {e.strerror or e}") from e
        cached_final = store.lookup(ex.key(graph.final))  # its file names, when it is cached already
        names = [*(cached_final.meta.get("files", {}) if cached_final else {}), *REPORT_FILES]
        conflicts = _conflicts(out, [n for n in names if _plain_name(n)], _legacy_files(out))
        if conflicts and not force:  # refused before anything runs; the final names are checked again at publish
            raise _refuse(out, conflicts)
        result = ex.build()
        report = _publish(ex, result, out, force, lock_timeout)
        if limit is not None:
            store.gc(limit, keep={ex.key(n.id) for n in graph.nodes})
        return BuildOutcome(report, out, result)
    raise AssertionError("unreachable")  # pragma: no cover


def check_out_dir(out: Path) -> None:
    """Refuse an out dir that is a filesystem root or the user's home directory.

    Raises:
        OutDirError: naming the directory.
    """
    resolved = out.expanduser().resolve()
    if resolved == Path(resolved.anchor):
        raise OutDirError(f"--out {out}: is a filesystem root; give accelc a directory of its own")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home directory known
        return
    if resolved == home:
        raise OutDirError(f"--out {out}: is your home directory; give accelc a directory of its own")


def _is_our_link(out: Path, name: str) -> bool:
    """Whether ``out/name`` is a top-level link a publish wrote (``.accelc/current/<name>``)."""
    p = out / name
    try:
        return p.is_symlink() and os.readlink(p) == f"{META_DIR}/current/{name}"
    except OSError:
        return False


def _legacy_files(out: Path) -> set[str]:
    """Plain files an earlier accelc (one that published files directly into the out dir) wrote.

    Trusted only when its ``accelc.lock`` is a regular file whose ``final.files`` are plain
    names of regular files here whose tree digest equals the recorded ``final.digest``; the
    reports and the lock beside them are then accelc's too. Anything else is not accelc's.
    """
    lock_path = out / LOCK_NAME
    if lock_path.is_symlink() or not lock_path.is_file():
        return set()
    try:
        lock = json.loads(lock_path.read_text())
        final = lock["final"]
        names, digest = list(final["files"]), final["digest"]
    except (OSError, ValueError, TypeError, KeyError):
        return set()
    if not all(isinstance(n, str) and _plain_name(n) and _regular(out / n) for n in names):
        return set()
    if names and tree_digest({n: sha256_file(out / n) for n in names}) != digest:
        return set()
    return set(names) | {n for n in REPORT_FILES if _regular(out / n)}


def _plain_name(name: str) -> bool:
    return safe_relative(name) and "/" not in name and name not in (".", "..")


def _regular(p: Path) -> bool:
    return not p.is_symlink() and p.is_file()


def _conflicts(out: Path, names: list[str], legacy: set[str]) -> list[str]:
    """Names a publish would take that hold something accelc did not write."""
    return sorted(n for n in names if os.path.lexists(out / n) and not _is_our_link(out, n) and n not in legacy)


def _refuse(out: Path, conflicts: list[str]) -> OutDirError:
    return OutDirError(
        f"--out {out}: holds {', '.join(conflicts)}, which accelc did not write; "
        "choose another out dir, move them away, or pass --force to replace them"
    )


def _sweep_out(out: Path, keep: set[str]) -> None:
    """Remove what interrupted publishes left: generations other than ``keep`` and the
    temporary files of earlier versions (``.<name>.<pid>.<random>.tmp``, ``.<report>.tmp``)."""
    gens = out / META_DIR / "generations"
    if gens.is_dir() and not gens.is_symlink():
        for d in gens.iterdir():
            if d.name not in keep and GENERATION_NAME.fullmatch(d.name) and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
    for p in out.iterdir():
        if LEGACY_TMP_NAME.fullmatch(p.name) and (p.is_symlink() or _regular(p)):
            p.unlink(missing_ok=True)
    for p in (out / META_DIR).glob("current.*.tmp"):
        if p.is_symlink():
            p.unlink(missing_ok=True)


def _publish(
    ex: Executor, result: BuildResult, out: Path, force: bool = False, lock_timeout: float | None = None
) -> dict[str, Any]:
    """Publish a new generation of the out dir under its lock: the final artifact (checked against
    its digests) and the reports are written into ``.accelc/generations/<id>/``, then the one
    pointer ``.accelc/current`` is switched by ``rename``; the top-level names are links through it.

    Raises:
        OutDirError: the out dir holds files accelc did not write at names this build publishes
            (unless ``force``), or accelc's own ``.accelc`` is not a real directory.
        OutputError: the out dir cannot be written; the previous generation stays current.
        LockTimeoutError: another build held the out dir's lock for longer than ``lock_timeout`` seconds.
    """
    meta_dir = out / META_DIR
    gen: Path | None = None
    out_lock = FileLock(str(out / OUT_LOCK), timeout=-1 if lock_timeout is None else lock_timeout)
    try:
        held = out_lock.acquire()  # a proxy that releases this one acquisition on exit
    except Timeout:
        raise LockTimeoutError(
            f"gave up after {lock_timeout:g} s waiting for lock {out / OUT_LOCK}: another build is publishing "
            f"into {out} (--lock-timeout)"
        ) from None
    try:
        with held:
            if meta_dir.is_symlink() or (meta_dir.exists() and not meta_dir.is_dir()):
                raise OutDirError(f"--out {out}: {META_DIR} is not accelc's directory (a symlink or a file)")
            (meta_dir / "generations").mkdir(parents=True, exist_ok=True)
            current = meta_dir / "current"
            live = os.readlink(current).rsplit("/", 1)[-1] if current.is_symlink() else ""
            _sweep_out(out, {live})
            legacy = _legacy_files(out)
            final_names = (
                sorted(f.name for f in result.final.path.iterdir() if f.name != "meta.json" and _regular(f))
                if result.final is not None
                else []
            )
            conflicts = _conflicts(out, [*final_names, *REPORT_FILES], legacy)
            if conflicts and not force:
                raise _refuse(out, conflicts)
            gen = meta_dir / "generations" / f"g{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            gen.mkdir()
            files: list[str] = []
            expected: dict[str, str] | None = None
            if result.final is not None:
                info = ex.store.lookup(ex.key(ex.graph.final))
                expected = info.meta.get("files") if info is not None else None
                try:
                    files = copy_artifact(result.final, gen, expected)
                except AccelcError as e:
                    result.final, result.failure = None, e
            report = build_report(ex, result, files)
            report.update(_remote_section(ex.store))
            lock = build_lock(ex, result, report)
            lock["final"]["sha256"] = {  # what this publish wrote (copies already checked against ``expected``)
                n: expected[n] if expected and n in expected else sha256_file(gen / n) for n in files
            }
            previous = meta_dir / "generations" / live if live else None
            write_outputs(gen, report, lock, deploy_manifest(ex, result, report), previous)
            published = [*files, *(n for n in REPORT_FILES if (gen / n).is_file())]  # plots drawn, deploy.json
            for name in published:  # new names dangle until the switch, so they show nothing early
                if not _is_our_link(out, name):
                    tmp_link = out / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
                    os.symlink(f"{META_DIR}/current/{name}", tmp_link)
                    os.replace(tmp_link, out / name)  # over a legacy accelc file, or a user's under --force
            tmp_ptr = meta_dir / f"current.{os.getpid()}.tmp"
            tmp_ptr.unlink(missing_ok=True)
            os.symlink(f"generations/{gen.name}", tmp_ptr)
            os.replace(tmp_ptr, current)  # the switch: readers see the old generation or the new one
            for p in out.iterdir():  # links to names the new generation lacks, legacy files it replaced
                if p.name not in published and (_is_our_link(out, p.name) or (p.name in legacy and _regular(p))):
                    p.unlink(missing_ok=True)
            _sweep_out(out, {gen.name})
            return report
    except OSError as e:
        if gen is not None and not (meta_dir / "current").resolve() == gen.resolve():
            shutil.rmtree(gen, ignore_errors=True)
        for p in out.glob(".*.tmp"):
            if LEGACY_TMP_NAME.fullmatch(p.name) and (p.is_symlink() or p.is_file()):
                p.unlink(missing_ok=True)
        what = "disk full" if is_no_space(e) else (e.strerror or str(e))
        raise OutputError(
            f"cannot write the build's outputs into {out}: {what}; the previous build's outputs there are unchanged"
        ) from e


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


__all__ = ["AccelcError", "BuildOutcome", "OutDirError", "OutputError", "build", "check_out_dir", "plan", "prepare"]
