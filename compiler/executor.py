"""Planning and executing a pass graph against the content-addressed store.

Cache keys are input-addressed: a node's key is a sha256 over its pass name and
version, the code it runs (the closure of the modules its pass's module imports, with
accelc's version: :func:`pass_code_digest`), its key material (options, or a source's
content digests and code closure), the keys of its inputs, the input signature, and the
versions of the packages that change its output.
So every key is known before anything runs (``accelc plan`` shows them all), and an
unchanged recipe maps to the same keys and reruns nothing.

Execution is demand-driven: a cached node is only *looked up* (its ``meta.json`` digest
checked); its files are re-hashed (and, when corrupt, evicted and rebuilt) only when a node
that runs needs them as input, or when it is the final artifact copied to the out dir.

A build that must wait for another build's lock on a key says which node and lock file it
waits on, and gives up after ``lock_timeout`` seconds (:class:`LockTimeoutError`).

Every pass output is checked before it is committed: the primary file must lie inside the
staging dir, and its bytes must pass the check its kind's plugin declares
(:class:`accelc.artifacts.ArtifactKind`: an ``onnx`` artifact passes ``onnx.checker``, an
``.npz`` kind is a numpy archive, a JSON kind is JSON, a torch kind a torch zip archive), so
a plugin that writes the wrong thing is named before anything downstream trusts it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from filelock import Timeout

from .artifacts import Artifact, sha256_file
from .cache import DEFAULT_LOCK_TIMEOUT_S, Store, is_no_space, safe_relative
from .code_identity import CodeClosure, code_closure, flush_import_cache, use_import_cache
from .environment import package_version, package_versions
from .errors import (
    AccelcError,
    CacheError,
    CapabilityError,
    CorruptEntryError,
    LockTimeoutError,
    PassError,
    PluginError,
    VerificationError,
)
from .graph import PassGraph, unmet
from .pass_api import DEFAULT_USER_CODE_TIMEOUT_S, PassContext, PassResult
from .runners import RunnerFactory


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class Reporter(Protocol):
    """Receives progress events (the CLI draws them; tests use :class:`SilentReporter`)."""

    def stage_started(self, node_id: str, pass_name: str) -> None: ...
    def stage_progress(self, node_id: str, message: str) -> None: ...
    # optional: ``stage_count(node_id, message, done, total)`` for counted steps (see report_progress)
    def stage_finished(self, node_id: str, cached: bool, seconds: float, metrics: dict[str, Any]) -> None: ...
    def notice(self, message: str) -> None: ...


def report_progress(
    reporter: Any, node_id: str, message: str, done: int | None = None, total: int | None = None
) -> None:
    """Pass ``ctx.progress(message, done, total)`` on to ``reporter``: counted steps (sensitivity units,
    trials, calibration batches, timed runs) to its ``stage_count`` when it has one (the CLI draws a
    progress bar with an ETA), else as ``"message done/total"`` to ``stage_progress``."""
    if done is None or total is None:
        reporter.stage_progress(node_id, message)
    elif hasattr(reporter, "stage_count"):
        reporter.stage_count(node_id, message, done, total)
    else:
        reporter.stage_progress(node_id, f"{message} {done}/{total}")


class SilentReporter:
    def stage_started(self, node_id: str, pass_name: str) -> None:
        pass

    def stage_progress(self, node_id: str, message: str) -> None:
        pass

    def stage_finished(self, node_id: str, cached: bool, seconds: float, metrics: dict[str, Any]) -> None:
        pass

    def notice(self, message: str) -> None:
        pass


@dataclass
class PlannedNode:
    """A node with its cache key and what the build would do: ``cached``, ``run`` or ``blocked``."""

    id: str
    pass_name: str
    key: str
    material: dict[str, Any]
    status: str
    reason: str = ""
    missing: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Stage:
    """One executed (or looked-up) node, as reported."""

    node: str
    pass_name: str
    cached: bool
    seconds: float
    kind: str
    key: str
    digest: str
    metrics: dict[str, Any]
    status: str = "ok"
    error: str | None = None
    ran_on: str | None = None  # the cluster node that ran it (accelc.ray_executor); None for a local build


@dataclass
class BuildResult:
    stages: list[Stage]
    final: Artifact | None
    failure: AccelcError | None = None


class Executor:
    """Plans and runs one pass graph on one host against one store."""

    def __init__(
        self,
        graph: PassGraph,
        registry: Any,
        store: Store,
        host: Any,
        reporter: Reporter | None = None,
        keys: dict[str, tuple[str, dict[str, Any]]] | None = None,
        user_code_timeout: float | None = DEFAULT_USER_CODE_TIMEOUT_S,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT_S,
    ):
        """``keys``: node id -> ``(key, material)`` computed elsewhere (a Ray task gets its driver's:
        :mod:`accelc.ray_executor`); ``user_code_timeout``: seconds a model source's ``load`` may take
        (``None``: no limit); ``lock_timeout``: seconds to wait for another build's lock on a key
        (``None``: no limit)."""
        self.graph = graph
        self.user_code_timeout = user_code_timeout
        self.lock_timeout = lock_timeout
        self.registry = registry
        self.store = store
        self.host = host
        self.reporter = reporter or SilentReporter()
        self.runners = RunnerFactory(registry.runners, registry.runtimes)
        self._verified: dict[str, Artifact] = {}
        self._keys: dict[str, tuple[str, dict[str, Any]]] = {}
        if keys is not None:  # computed elsewhere (a Ray task gets its driver's keys: accelc.ray_executor)
            self._keys = dict(keys)
        else:
            self.compute_keys()

    # -- keys and plan --------------------------------------------------------------------------
    def compute_keys(self) -> None:
        sig = self.graph.recipe.signature.to_json()
        use_import_cache(self.store.root / "code-imports.json")
        code: dict[type, str | None] = {}
        for node in self.graph.nodes:
            p = self.registry.passes[node.pass_name]
            if type(p) not in code:
                code[type(p)] = pass_code_digest(type(p))
            material = {
                "pass": node.pass_name,
                "version": p.version,
                "code": code[type(p)],
                "material": p.key_material(node.options, self.host_for(node), self.registry),
                "inputs": {slot: self._keys[up][0] for slot, up in sorted(node.inputs.items())},
                "signature": sig,
                "packages": package_versions(p.env_packages),
            }
            key = hashlib.sha256(canonical_json(material).encode()).hexdigest()
            self._keys[node.id] = (key, material)
        flush_import_cache()

    def host_for(self, node: Any) -> Any:
        """The host whose facts enter ``node``'s key (this one; a cluster executor names the node's machine)."""
        return self.host

    def keys(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Node id -> ``(key, key material)`` for every node."""
        return dict(self._keys)

    def key(self, node_id: str) -> str:
        return self._keys[node_id][0]

    def plan(self, previous_lock: dict[str, Any] | None = None) -> list[PlannedNode]:
        """Each node's key and status. ``reason`` says why a node is not cached, compared with
        ``previous_lock`` (the lock file of the last build into the same out dir) when given."""
        blocked = unmet(self.graph, self.host)
        prev = {n["id"]: n for n in (previous_lock or {}).get("nodes", [])}
        out = []
        for node in self.graph.nodes:
            key, material = self._keys[node.id]
            if node.id in blocked:
                miss = blocked[node.id]
                why = "; ".join(f"{c} ({d})" for c, d in miss)
                out.append(PlannedNode(node.id, node.pass_name, key, material, "blocked", f"needs {why}", miss))
            elif self.store.lookup(key) is not None:
                out.append(PlannedNode(node.id, node.pass_name, key, material, "cached"))
            else:
                why = _why(material, prev.get(node.id), node, self.graph.recipe)
                out.append(PlannedNode(node.id, node.pass_name, key, material, "run", why))
        return out

    # -- execution ----------------------------------------------------------------------------
    def build(self) -> BuildResult:
        """Run the plan in order. Stops at the first failure, returning what completed and the error.

        Every completed node stays in the store, so a rerun after fixing the cause starts there.
        """
        stages: list[Stage] = []
        for planned in self.plan():
            node = self.graph.by_id[planned.id]
            if planned.status == "blocked":
                cap, detail = planned.missing[0]
                err = CapabilityError(
                    node.id, [c for c, _ in planned.missing], "; ".join(d for _, d in planned.missing)
                )
                stages.append(
                    Stage(node.id, node.pass_name, False, 0.0, node.produces, planned.key, "", {}, "blocked", str(err))
                )
                self.reporter.stage_finished(node.id, False, 0.0, {"status": "blocked"})
                return BuildResult(stages, None, err)
            self.reporter.stage_started(node.id, node.pass_name)
            t0 = time.perf_counter()
            try:
                info_meta, cached = self._ensure(node.id)
            except AccelcError as e:
                secs = time.perf_counter() - t0
                stages.append(
                    Stage(node.id, node.pass_name, False, secs, node.produces, planned.key, "", {}, "failed", str(e))
                )
                self.reporter.stage_finished(node.id, False, secs, {"status": "failed"})
                return BuildResult(stages, None, e)
            secs = time.perf_counter() - t0
            metrics = info_meta.get("metrics", {})
            stage = Stage(
                node.id, node.pass_name, cached, secs, info_meta["kind"], planned.key, info_meta["digest"], metrics
            )
            stages.append(stage)
            try:
                self.registry.passes[node.pass_name].check(metrics, node.options)
            except VerificationError as e:
                stage.status, stage.error = "failed", f"{node.id}: {e}"
                self.reporter.stage_finished(node.id, cached, secs, {**metrics, "status": "failed"})
                return BuildResult(stages, None, VerificationError(f"verification failed at {node.id}: {e}"))
            self.reporter.stage_finished(node.id, cached, secs, metrics)
        try:
            final = self.open(self.graph.final)
        except AccelcError as e:
            return BuildResult(stages, None, e)
        return BuildResult(stages, final)

    def open(self, node_id: str) -> Artifact:
        """The node's artifact with its files checked against their digests; a corrupt or
        missing entry is reported, evicted and rebuilt (with its own inputs, recursively).

        Eviction and rebuild happen under the key's lock, after a second check: a concurrent
        build that repaired the entry first is reused, never evicted.
        """
        if node_id in self._verified:
            return self._verified[node_id]
        key = self.key(node_id)
        try:
            art = self.store.open(key, verify=True)
        except CorruptEntryError:
            with self._lock(node_id, key):
                try:
                    art = self.store.open(key, verify=True)  # repaired by a concurrent build meanwhile
                except CorruptEntryError as e:
                    if os.path.lexists(self.store.entries / key):
                        self.reporter.notice(f"{e}; rebuilding it")
                    self.store.evict(key)
                    self._build_locked(node_id, key)
                    art = self.store.open(key, verify=True)
        self._verified[node_id] = art
        return art

    def _ensure(self, node_id: str) -> tuple[dict[str, Any], bool]:
        """Make sure the node's entry exists; returns ``(meta, cached)``."""
        key = self.key(node_id)
        info = self.store.lookup(key)
        if info is not None:
            self.store.touch(key)  # a cache hit is a use (least-recently-used eviction)
            return info.meta, True
        with self._lock(node_id, key):
            info = self.store.lookup(key)  # built by a concurrent process while we waited
            if info is not None:
                self.store.touch(key)
                return info.meta, True
            if self.store.has_debris(key):
                self.reporter.notice(
                    f"cache entry {key[:12]} ({node_id}) has a missing or altered meta.json; rebuilding it"
                )
                self.store.evict(key)
            return self._build_locked(node_id, key), False

    @contextlib.contextmanager
    def _lock(self, node_id: str, key: str) -> Any:
        """Hold ``key``'s lock; when another build holds it, say which node and lock file this
        build waits on, and give up after ``lock_timeout`` seconds.

        Raises:
            LockTimeoutError: the lock was not free within ``lock_timeout``.
        """
        lock = self.store.lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            limit = self.lock_timeout
            until = f"up to {limit:g} s (--lock-timeout)" if limit is not None else "without a limit"
            waiting = f"waiting for lock {lock.lock_file}: another build is computing {node_id} ({key[:12]})"
            self.reporter.notice(f"{waiting}; waiting {until}")
            self.reporter.stage_progress(node_id, waiting)
            try:
                lock.acquire(timeout=-1 if limit is None else limit)
            except Timeout:
                raise LockTimeoutError(
                    f"{node_id}: gave up after {limit:g} s waiting for lock {lock.lock_file}, held by another "
                    "build of the same cache entry; raise --lock-timeout, or stop the build that holds it"
                ) from None
        try:
            yield lock
        finally:
            lock.release()

    def _build_locked(self, node_id: str, key: str) -> dict[str, Any]:
        """Run the node (its inputs opened, and rebuilt if corrupt) and commit it; the caller holds ``lock(key)``."""
        node = self.graph.by_id[node_id]
        inputs = {slot: self.open(up) for slot, up in node.inputs.items()}
        self._run(node, key, inputs)
        info = self.store.lookup(key)
        if info is None:
            raise CacheError(
                f"cache entry {key[:12]} ({node_id}) vanished right after it was written under {self.store.root}"
            )
        return info.meta

    def _run(self, node: Any, key: str, inputs: dict[str, Artifact]) -> None:
        p = self.registry.passes[node.pass_name]
        plugin = self.registry.plugin_of("passes", node.pass_name)
        staging = self.store.staging(key)
        scratch = self.store.pass_scratch(staging)
        who = f"pass '{node.pass_name}' (plugin '{plugin}')"
        ctx = PassContext(
            workdir=staging,
            signature=self.graph.recipe.signature,
            host=self.host,
            runners=self.runners,
            sources=self.registry,
            node=node.id,
            progress=functools.partial(report_progress, self.reporter, node.id),
            scratch=scratch,
            user_code_timeout=self.user_code_timeout,
        )
        try:
            try:
                result = p.run(ctx, inputs, dict(node.options))
            except AccelcError:
                raise
            except Exception as e:
                if is_no_space(e):
                    raise CacheError(
                        f"disk full while pass '{node.id}' (plugin '{plugin}') wrote its output under "
                        f"{self.store.root}; nothing of it was kept. Free space (e.g. `accelc cache gc "
                        f"--max-size MIB`) and build again ({type(e).__name__}: {e})"
                    ) from e
                raise PassError(f"pass '{node.id}' (plugin '{plugin}') failed: {type(e).__name__}: {e}") from e
            if not isinstance(result, PassResult):
                raise PluginError(f"{who} returned {type(result).__name__}, not a PassResult")
            if result.kind is not None and result.kind != node.produces:
                raise PluginError(f"{who} returned an artifact of kind '{result.kind}', but declares '{node.produces}'")
            main = result.main
            if not isinstance(main, str) or not safe_relative(main):
                raise PluginError(f"{who} returned main file {main!r}, which is not a relative path inside its workdir")
            if (staging / main).is_symlink() or not (staging / main).is_file():
                raise PluginError(f"{who} returned main file '{main}', which it did not write")
            kind = self.registry.kinds.get(node.produces)
            problem = kind.problem(staging / main) if kind is not None else None
            if problem:
                raise PluginError(f"{who} declares output kind '{node.produces}', but its {main} {problem}")
            record = {
                "node": node.id,
                "pass": node.pass_name,
                "plugin": plugin,
                "version": p.version,
                "metrics": result.metrics,
                "meta": result.meta,
                "material": self._keys[node.id][1],
            }
            self.store.commit(key, staging, node.produces, result.main, record)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def pass_code_closure(cls: type) -> CodeClosure | None:
    """The code a pass runs: the closure of the module defining ``cls`` over local modules and
    the installed modules of accelc and of the pass's own package (a plugin's), with the versions
    of other installed distributions it imports (:mod:`accelc.code_identity`). ``None`` when the
    class has no module on disk."""
    mod = getattr(cls, "__module__", "") or ""
    if not mod or mod == "__main__":
        return None
    try:
        return code_closure(mod, follow={"accelc", mod.split(".", 1)[0]})
    except ModuleNotFoundError:
        return None


def pass_code_digest(cls: type) -> str | None:
    """sha256 over the code a pass runs (:func:`pass_code_closure`) and accelc's own version, so
    editing a pass or any module it imports, or upgrading accelc, without bumping the pass's
    ``version`` still invalidates its entries (``None`` when the source is not on disk)."""
    closure = pass_code_closure(cls)
    if closure is None:
        return None
    return hashlib.sha256(f"{closure.digest()}\0accelc {package_version('accelc')}".encode()).hexdigest()


def _why(material: dict[str, Any], previous: dict[str, Any] | None, node: Any = None, recipe: Any = None) -> str:
    """Why a node must run: what changed since the previous build's lock file, if known; changed
    options are named as the recipe writes them (:mod:`accelc.explain`) when ``node`` is given."""
    if previous is None or "material" not in previous:
        return "not in cache"
    old = previous["material"]
    changed = [k for k in ("version", "code", "material", "signature", "packages") if old.get(k) != material.get(k)]
    changed_inputs = [s for s, k in material["inputs"].items() if old.get("inputs", {}).get(s) != k]
    parts = []
    if "material" in changed:
        a, b = old.get("material", {}), material["material"]
        keys = sorted(
            k
            for k in set(a.get("options", a)) | set(b.get("options", b))
            if a.get("options", a).get(k) != b.get("options", b).get(k)
        )
        if node is not None:
            from .explain import changed_fields

            fields = changed_fields(node, a, b, recipe)
            parts.append(f"changed in the recipe: {', '.join(fields) or 'the source'}")
        else:
            parts.append(f"options changed: {', '.join(keys) or 'source'}")
    if "version" in changed:
        parts.append("pass version changed")
    elif "code" in changed:
        parts.append("pass code changed")
    if "packages" in changed:
        parts.append("package versions changed")
    if "signature" in changed:
        parts.append("input signature changed")
    if changed_inputs:
        parts.append(f"input changed: {', '.join(changed_inputs)}")
    return "; ".join(parts) or "entry missing from cache"


def copy_artifact(art: Artifact, out_dir: Path, expected: dict[str, str] | None = None) -> list[str]:
    """Copy an artifact's payload files into ``out_dir``; returns their names.

    Each file is written under a unique temporary name, checked against its recorded sha256
    (``expected``, the entry's ``files`` map) when given, and renamed into place, so a reader
    of ``out_dir`` never sees a half-written or unverified file and concurrent builds into the
    same out dir do not trip over each other's temporary files.

    Raises:
        CorruptEntryError: a copied file does not match its recorded digest (the copy is removed).
        OSError: the out dir cannot be written (the temporary file is removed).
    """
    names = []
    for f in sorted(art.path.iterdir()):
        if f.name == "meta.json" or f.is_symlink() or not f.is_file():
            continue
        tmp = out_dir / f".{f.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            shutil.copyfile(f, tmp)
            if expected is not None and sha256_file(tmp) != expected.get(f.name):
                raise CorruptEntryError(
                    f"{f.name} copied from cache entry {art.path.name[:12]} does not match its recorded digest"
                )
            tmp.replace(out_dir / f.name)
        finally:
            tmp.unlink(missing_ok=True)
        names.append(f.name)
    return names
