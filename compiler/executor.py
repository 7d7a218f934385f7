"""Planning and executing a pass graph against the content-addressed store.

Cache keys are input-addressed: a node's key is a sha256 over its pass name and
version, its key material (options, or a source's content digests), the keys of its
inputs, the input signature, and the versions of the packages that change its output.
So every key is known before anything runs (``accelc plan`` shows them all), and an
unchanged recipe maps to the same keys and reruns nothing.

Execution is demand-driven: a cached node is only *looked up*; its files are re-hashed
(and, when corrupt, evicted and rebuilt) only when a node that runs needs them as input,
or when it is the final artifact copied to the out dir.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .artifacts import Artifact
from .cache import Store
from .environment import package_versions
from .errors import (
    AccelcError,
    CapabilityError,
    CorruptEntryError,
    PassError,
    PluginError,
    VerificationError,
)
from .graph import PassGraph, unmet
from .pass_api import PassContext, PassResult
from .runners import RunnerFactory


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class Reporter(Protocol):
    """Receives progress events (the CLI draws them; tests use :class:`SilentReporter`)."""

    def stage_started(self, node_id: str, pass_name: str) -> None: ...
    def stage_progress(self, node_id: str, message: str) -> None: ...
    def stage_finished(self, node_id: str, cached: bool, seconds: float, metrics: dict[str, Any]) -> None: ...
    def notice(self, message: str) -> None: ...


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


@dataclass
class BuildResult:
    stages: list[Stage]
    final: Artifact | None
    failure: AccelcError | None = None


class Executor:
    """Plans and runs one pass graph on one host against one store."""

    def __init__(self, graph: PassGraph, registry: Any, store: Store, host: Any, reporter: Reporter | None = None):
        self.graph = graph
        self.registry = registry
        self.store = store
        self.host = host
        self.reporter = reporter or SilentReporter()
        self.runners = RunnerFactory(registry.runners)
        self._verified: dict[str, Artifact] = {}
        self._keys: dict[str, tuple[str, dict[str, Any]]] = {}
        self.compute_keys()

    # -- keys and plan --------------------------------------------------------------------------
    def compute_keys(self) -> None:
        sig = self.graph.recipe.signature.to_json()
        for node in self.graph.nodes:
            p = self.registry.passes[node.pass_name]
            material = {
                "pass": node.pass_name,
                "version": p.version,
                "material": p.key_material(node.options, self.host, self.registry),
                "inputs": {slot: self._keys[up][0] for slot, up in sorted(node.inputs.items())},
                "signature": sig,
                "packages": package_versions(p.env_packages),
            }
            key = hashlib.sha256(canonical_json(material).encode()).hexdigest()
            self._keys[node.id] = (key, material)

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
                out.append(PlannedNode(node.id, node.pass_name, key, material, "run", _why(material, prev.get(node.id))))
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
                err = CapabilityError(node.id, [c for c, _ in planned.missing], "; ".join(d for _, d in planned.missing))
                stages.append(Stage(node.id, node.pass_name, False, 0.0, node.produces, planned.key, "", {}, "blocked", str(err)))
                self.reporter.stage_finished(node.id, False, 0.0, {"status": "blocked"})
                return BuildResult(stages, None, err)
            self.reporter.stage_started(node.id, node.pass_name)
            t0 = time.perf_counter()
            try:
                info_meta, cached = self._ensure(node.id)
            except AccelcError as e:
                secs = time.perf_counter() - t0
                stages.append(Stage(node.id, node.pass_name, False, secs, node.produces, planned.key, "", {}, "failed", str(e)))
                self.reporter.stage_finished(node.id, False, secs, {"status": "failed"})
                return BuildResult(stages, None, e)
            secs = time.perf_counter() - t0
            metrics = info_meta.get("metrics", {})
            stage = Stage(node.id, node.pass_name, cached, secs, info_meta["kind"], planned.key,
                          info_meta["digest"], metrics)
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
        missing entry is reported, evicted and rebuilt (with its own inputs, recursively)."""
        if node_id in self._verified:
            return self._verified[node_id]
        key = self.key(node_id)
        try:
            art = self.store.open(key, verify=True)
        except CorruptEntryError as e:
            if self.store.lookup(key) is not None:
                self.reporter.notice(f"{e}; rebuilding it")
            self.store.evict(key)
            self._ensure(node_id)
            art = self.store.open(key, verify=True)
        self._verified[node_id] = art
        return art

    def _ensure(self, node_id: str) -> tuple[dict[str, Any], bool]:
        """Make sure the node's entry exists; returns ``(meta, cached)``."""
        key = self.key(node_id)
        info = self.store.lookup(key)
        if info is not None:
            return info.meta, True
        with self.store.lock(key):
            info = self.store.lookup(key)  # built by a concurrent process while we waited
            if info is not None:
                return info.meta, True
            node = self.graph.by_id[node_id]
            inputs = {slot: self.open(up) for slot, up in node.inputs.items()}
            self._run(node, key, inputs)
            info = self.store.lookup(key)
            assert info is not None
            return info.meta, False

    def _run(self, node: Any, key: str, inputs: dict[str, Artifact]) -> None:
        p = self.registry.passes[node.pass_name]
        plugin = self.registry.plugin_of("passes", node.pass_name)
        staging = self.store.staging(key)
        ctx = PassContext(
            workdir=staging,
            signature=self.graph.recipe.signature,
            host=self.host,
            runners=self.runners,
            sources=self.registry,
            node=node.id,
            progress=lambda msg: self.reporter.stage_progress(node.id, msg),
        )
        try:
            try:
                result = p.run(ctx, inputs, dict(node.options))
            except AccelcError:
                raise
            except Exception as e:
                raise PassError(f"pass '{node.id}' (plugin '{plugin}') failed: {type(e).__name__}: {e}") from e
            if not isinstance(result, PassResult):
                raise PluginError(
                    f"pass '{node.pass_name}' (plugin '{plugin}') returned {type(result).__name__}, not a PassResult"
                )
            kind = getattr(result, "kind", None) or node.produces
            if kind != node.produces:
                raise PluginError(
                    f"pass '{node.pass_name}' (plugin '{plugin}') returned an artifact of kind '{kind}', "
                    f"but declares '{node.produces}'"
                )
            if not (staging / result.main).is_file():
                raise PluginError(
                    f"pass '{node.pass_name}' (plugin '{plugin}') returned main file '{result.main}', "
                    "which it did not write"
                )
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
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _why(material: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """Why a node must run: what changed since the previous build's lock file, if known."""
    if previous is None or "material" not in previous:
        return "not in cache"
    old = previous["material"]
    changed = [k for k in ("version", "material", "signature", "packages") if old.get(k) != material.get(k)]
    changed_inputs = [s for s, k in material["inputs"].items() if old.get("inputs", {}).get(s) != k]
    parts = []
    if "material" in changed:
        a, b = old.get("material", {}), material["material"]
        keys = sorted(k for k in set(a.get("options", a)) | set(b.get("options", b))
                      if a.get("options", a).get(k) != b.get("options", b).get(k))
        parts.append(f"options changed: {', '.join(keys) or 'source'}")
    if "version" in changed:
        parts.append("pass version changed")
    if "packages" in changed:
        parts.append("package versions changed")
    if "signature" in changed:
        parts.append("input signature changed")
    if changed_inputs:
        parts.append(f"input changed: {', '.join(changed_inputs)}")
    return "; ".join(parts) or "entry missing from cache"


def copy_artifact(art: Artifact, out_dir: Path) -> list[str]:
    """Copy an artifact's payload files into ``out_dir`` atomically (temp name + rename); returns names."""
    names = []
    for f in sorted(art.path.iterdir()):
        if f.name == "meta.json" or not f.is_file():
            continue
        tmp = out_dir / f".{f.name}.tmp"
        shutil.copyfile(f, tmp)
        tmp.replace(out_dir / f.name)
        names.append(f.name)
    return names
