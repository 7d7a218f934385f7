"""Builds spread over a Ray cluster: every pass-graph node is a Ray task on a machine that has what it needs.

``accelc build --executor ray [--ray-address ADDR] RECIPE...`` lowers every recipe, computes
every key on the driver, and merges the graphs: nodes with the same key (the common upstream
of several recipes or targets) are one task. Each task asks Ray for the resources of its pass
and target (:func:`node_resources`): a node that runs on the GPU asks for ``num_gpus=1`` and
the target's ``accelerator_type`` (``T4`` for the ``t4`` target, as in
``ray.util.accelerators``), any other node for one CPU. A task depends on its inputs' tasks,
so Ray runs a node once its inputs exist and independent nodes at once.

Artifacts travel through the cache, never through the driver: a task opens its inputs from
its machine's store (downloading them from the remote cache, checked against their digests),
commits its output and uploads it (:mod:`accelc.remote`); what comes back to the driver is
the entry's record. With ``--cache-url`` each machine keeps its own local cache (its
``$ACCELC_CACHE_DIR`` or user cache dir); without one, every task uses the driver's cache dir,
which must then be one shared mount.

Keys: a pass whose output depends on the machine (its ``key_extras``: a TensorRT engine on
the GPU model and TensorRT version, benchmark numbers on the CPU) is keyed with the facts of
one cluster node offering its resources (probed by a tiny task) and pinned to that node, so
the key describes the machine that built the entry. Other nodes run wherever Ray puts them.

A task whose worker dies is retried by Ray (``max_retries``); a pass that raises is not
(its error is the build's, as in a local build). The cache holds no partial entry either way:
a killed pass leaves only a staging dir, which nothing trusts.

Ray is optional (``pip install 'accelc[cluster]'``) and imported only here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import Store, default_root
from .errors import AccelcError, CapabilityError, VerificationError
from .executor import BuildResult, Executor, Reporter, SilentReporter, Stage
from .graph import Node, PassGraph
from .host import Host
from .pass_api import Pass

#: Target name -> Ray accelerator type (the strings of ``ray.util.accelerators``: NVIDIA_TESLA_T4, ...).
#: A target profile may set its own ``accelerator_type`` attribute instead.
ACCELERATOR_TYPES = {"t4": "T4", "a100": "A100", "h100": "H100", "h200": "H200"}
#: Ray's default for task retries after a worker or node dies.
DEFAULT_MAX_RETRIES = 3


@dataclass(frozen=True)
class TaskResources:
    """What one node's Ray task asks for.

    Attributes:
        num_cpus: CPU slots (Ray's logical CPUs).
        num_gpus: GPU count (0 for CPU passes).
        accelerator_type: Ray accelerator type (``"T4"``) or ``None`` for any GPU / no GPU.
        pinned: the node's key depends on the machine, so it runs on the probed node of its class.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None
    pinned: bool = False

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for ``remote_fn.options(...)``."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts

    @property
    def resource_class(self) -> tuple[float, float, str | None]:
        return (self.num_cpus, self.num_gpus, self.accelerator_type)

    def describe(self) -> str:
        """``"1 CPU"``, ``"1 GPU (T4) + 1 CPU"``, with ``, pinned`` for machine-keyed nodes."""
        if self.num_gpus:
            gpu = f"{self.num_gpus:g} GPU" + (f" ({self.accelerator_type})" if self.accelerator_type else "")
            text = f"{gpu} + {self.num_cpus:g} CPU"
        else:
            text = f"{self.num_cpus:g} CPU"
        return text + (", pinned to one node (its key names the machine)" if self.pinned else "")

    def fits(self, node_resources: dict[str, float]) -> bool:
        """Whether a cluster node offering ``node_resources`` (Ray's ``Resources`` map) can ever run this."""
        if node_resources.get("CPU", 0) < self.num_cpus or node_resources.get("GPU", 0) < self.num_gpus:
            return False
        return not self.accelerator_type or node_resources.get(f"accelerator_type:{self.accelerator_type}", 0) > 0


def accelerator_type(target: Any) -> str | None:
    """The Ray accelerator type of a GPU target (``None``: any GPU, e.g. the ``cuda`` target)."""
    return getattr(target, "accelerator_type", None) or ACCELERATOR_TYPES.get(target.name)


def host_dependent(p: Pass) -> bool:
    """Whether the pass's key material includes facts of the machine it runs on."""
    return type(p).key_extras is not Pass.key_extras


def node_resources(node: Node, graph: PassGraph, registry: Any) -> TaskResources:
    """The resources ``node``'s task asks for: a GPU (of the target's type) for nodes that run on
    CUDA, one CPU otherwise."""
    pinned = host_dependent(registry.passes[node.pass_name])
    if "cuda" in node.requires:
        return TaskResources(1.0, 1.0, accelerator_type(graph.target), pinned)
    return TaskResources(1.0, 0.0, None, pinned)


class SnapshotHost(Host):
    """A :class:`Host` whose facts were read on another machine (a cluster node), for computing keys."""

    def __init__(self, facts: dict[str, Any]):
        super().__init__({"cuda": facts.get("cuda"), "tensorrt": facts.get("tensorrt")})
        self.facts = facts
        self.__dict__["cpu_model"] = facts.get("cpu_model", "")
        self.__dict__["cpu_flags"] = set(facts.get("cpu_flags", ()))

    @property
    def cpu_count(self) -> int:  # type: ignore[override]
        return int(self.facts.get("cpu_count", 1))


def host_facts() -> dict[str, Any]:
    """This machine's facts that passes put in their keys (run inside a probe task)."""
    from accelc.passes.tensorrt import tensorrt_version  # at run time, on the worker: the core imports no pass

    h = Host()
    return {
        "cpu_model": h.cpu_model,
        "cpu_flags": sorted(h.cpu_flags),
        "cpu_count": h.cpu_count,
        "cuda": h.cuda,
        "tensorrt": tensorrt_version(h),
    }


class ClusterKeyedExecutor(Executor):
    """An executor whose host-dependent nodes are keyed with the facts of their cluster node."""

    def __init__(self, *args: Any, hosts: dict[str, Host] | None = None, **kwargs: Any):
        self._node_hosts = hosts or {}
        super().__init__(*args, **kwargs)

    def host_for(self, node: Any) -> Any:
        return self._node_hosts.get(node.id, self.host)


@dataclass
class RayPlanNode:
    """One node of a cluster plan: which recipe(s) it serves, its key and what its task asks for."""

    id: str
    key: str
    resources: TaskResources
    recipes: list[str] = field(default_factory=list)


def plan_resources(graph: PassGraph, registry: Any) -> dict[str, TaskResources]:
    """Node id -> what its Ray task asks for (``accelc plan --executor ray``)."""
    return {n.id: node_resources(n, graph, registry) for n in graph.nodes}


# -- the task -----------------------------------------------------------------------------------
def _error_payload(e: AccelcError) -> dict[str, Any]:
    return {"module": type(e).__module__, "cls": type(e).__qualname__, "message": str(e), "exit_code": e.exit_code}


def _error_from(payload: dict[str, Any]) -> AccelcError:
    """Rebuild a worker's error on the driver (same class and message; the class's own ``__init__`` is skipped)."""
    import importlib

    cls: Any = AccelcError
    try:
        found = getattr(importlib.import_module(payload["module"]), payload["cls"])
        if isinstance(found, type) and issubclass(found, AccelcError):
            cls = found
    except (ImportError, AttributeError):
        pass
    err = cls.__new__(cls)
    Exception.__init__(err, payload["message"])
    err.exit_code = payload["exit_code"]
    return err


def run_node(
    payload: dict[str, Any], node_id: str, *upstream: dict[str, Any]
) -> dict[str, Any]:
    """Body of one node's Ray task: open inputs from the cache, run the pass (or find its entry), commit.

    ``payload`` holds the graph, registry, every key (computed on the driver), the worker's cache
    dir (``None``: its own default) and the remote URL. Returns ``{"status": "ok", "meta",
    "cached", "seconds", "ran_on"}``, or ``{"status": "failed"|"blocked"|"skipped", "error"}``.
    """
    import ray

    ctx = ray.get_runtime_context()
    where = f"{ray.util.get_node_ip_address()} (node {ctx.get_node_id()[:8]})"
    if any(u.get("status") != "ok" for u in upstream):
        return {"status": "skipped", "ran_on": where}
    graph: PassGraph = payload["graph"]
    node = graph.by_id[node_id]
    host = Host()
    # cuda and the compute capability are what Ray's GPU resources stand for; the rest is checked here.
    missing = [(c, d) for c, d in host.missing(node.requires) if c != "cuda" and not c.startswith("sm")]
    if missing:
        err = CapabilityError(node.id, [c for c, _ in missing], "; ".join(d for _, d in missing) + f" on {where}")
        return {"status": "blocked", "error": _error_payload(err), "ran_on": where}
    from .remote import open_store

    t0 = time.perf_counter()
    try:
        store = open_store(payload["cache_dir"] or default_root(), payload["cache_url"])
        ex = Executor(graph, payload["registry"], store, host, SilentReporter(), keys=payload["keys"])
        meta, cached = ex._ensure(node_id)
    except AccelcError as e:
        return {"status": "failed", "error": _error_payload(e), "seconds": time.perf_counter() - t0, "ran_on": where}
    return {"status": "ok", "meta": meta, "cached": cached, "seconds": time.perf_counter() - t0, "ran_on": where}


def _probe() -> dict[str, Any]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "facts": host_facts()}


# -- the driver ---------------------------------------------------------------------------------
@dataclass
class ClusterBuild:
    """One recipe of a cluster build: its graph, driver-side executor and result."""

    graph: PassGraph
    executor: Executor
    resources: dict[str, TaskResources]
    result: BuildResult | None = None


class RayBuilder:
    """Runs the merged pass graphs of several recipes on a Ray cluster (see the module docstring).

    Args:
        graphs: lowered recipes (``accelc.build.prepare``).
        registry: the registry they were lowered with (sent to the workers).
        store: the driver's store (tiered over ``cache_url`` when given); the final artifacts
            are opened from it.
        cache_url: remote cache URL the workers share (``None``: they share ``store.root``).
        max_retries: Ray retries of a task whose worker died.

    Raises:
        CacheError: without ``cache_url`` and with a store that is not on a path the workers see.
    """

    def __init__(
        self,
        graphs: list[PassGraph],
        registry: Any,
        store: Store,
        cache_url: str | None,
        reporter: Reporter | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ):
        import ray

        self.ray = ray
        self.registry = registry
        self.store = store
        self.cache_url = cache_url
        self.reporter = reporter or SilentReporter()
        self.max_retries = max_retries
        self.alive = [n for n in ray.nodes() if n.get("Alive")]
        self.builds: list[ClusterBuild] = []
        self._pins: dict[tuple[float, float, str | None], tuple[str, Host] | None] = {}
        for g in graphs:
            res = plan_resources(g, registry)
            hosts: dict[str, Host] = {}
            for n in g.nodes:
                r = res[n.id]
                if r.pinned and self._feasible(r):
                    pin = self._pin(r)
                    if pin is not None:
                        hosts[n.id] = pin[1]
            ex = ClusterKeyedExecutor(g, registry, store, Host(), self.reporter, hosts=hosts)
            self.builds.append(ClusterBuild(g, ex, res))

    def _feasible(self, r: TaskResources) -> bool:
        return any(r.fits(n.get("Resources", {})) for n in self.alive)

    def _pin(self, r: TaskResources) -> tuple[str, Host] | None:
        """The cluster node a machine-keyed node of this resource class runs on, and its facts."""
        if r.resource_class not in self._pins:
            probe = self.ray.remote(_probe).options(**r.ray_options(), max_retries=self.max_retries)
            got = self.ray.get(probe.remote())
            self._pins[r.resource_class] = (got["node_id"], SnapshotHost(got["facts"]))
        return self._pins[r.resource_class]

    def run(self) -> list[BuildResult]:
        """Submit every distinct node once, then collect each recipe's stages in its graph order."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = self.ray.remote(run_node)
        refs: dict[str, Any] = {}
        blocked: dict[str, str] = {}
        for b in self.builds:
            keys = b.executor.keys()
            payload = self.ray.put(
                {
                    "graph": b.graph,
                    "registry": self.registry,
                    "keys": keys,
                    "cache_dir": None if self.cache_url else str(self.store.root),
                    "cache_url": self.cache_url,
                }
            )
            for n in b.graph.nodes:
                key = keys[n.id][0]
                if key in refs or key in blocked:
                    continue
                r = b.resources[n.id]
                ups = [keys[u][0] for u in n.inputs.values()]
                if any(u in blocked for u in ups):
                    blocked[key] = next(blocked[u] for u in ups if u in blocked)
                    continue
                if not self._feasible(r):
                    blocked[key] = f"no node of the Ray cluster offers {r.describe()}"
                    continue
                opts = {**r.ray_options(), "max_retries": self.max_retries, "name": f"accelc {n.id}"}
                if r.pinned and self._pins.get(r.resource_class):
                    opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                        self._pins[r.resource_class][0], soft=False  # type: ignore[index]
                    )
                refs[key] = task.options(**opts).remote(payload, n.id, *(refs[u] for u in ups))
        return [self._collect(b, refs, blocked) for b in self.builds]

    def _collect(self, b: ClusterBuild, refs: dict[str, Any], blocked: dict[str, str]) -> BuildResult:
        stages: list[Stage] = []
        ex = b.executor
        for n in b.graph.nodes:
            key = ex.key(n.id)
            if key in blocked:
                err = CapabilityError(n.id, [b.resources[n.id].describe()], blocked[key])
                stages.append(Stage(n.id, n.pass_name, False, 0.0, n.produces, key, "", {}, "blocked", str(err)))
                self.reporter.stage_finished(n.id, False, 0.0, {"status": "blocked"})
                b.result = BuildResult(stages, None, err)
                return b.result
            self.reporter.stage_started(n.id, n.pass_name)
            got = self.ray.get(refs[key])
            secs = float(got.get("seconds", 0.0))
            if got["status"] != "ok":
                err = _error_from(got["error"])
                status = "blocked" if got["status"] == "blocked" else "failed"
                stages.append(
                    Stage(n.id, n.pass_name, False, secs, n.produces, key, "", {}, status, str(err), got.get("ran_on"))
                )
                self.reporter.stage_finished(n.id, False, secs, {"status": status})
                b.result = BuildResult(stages, None, err)
                return b.result
            meta = got["meta"]
            metrics = meta.get("metrics", {})
            stage = Stage(
                n.id, n.pass_name, got["cached"], secs, meta["kind"], key, meta["digest"], metrics,
                ran_on=got["ran_on"],
            )
            stages.append(stage)
            try:
                self.registry.passes[n.pass_name].check(metrics, n.options)
            except VerificationError as e:
                stage.status, stage.error = "failed", f"{n.id}: {e}"
                self.reporter.stage_finished(n.id, got["cached"], secs, {**metrics, "status": "failed"})
                b.result = BuildResult(stages, None, VerificationError(f"verification failed at {n.id}: {e}"))
                return b.result
            self.reporter.stage_finished(n.id, got["cached"], secs, {"ran_on": got["ran_on"], **metrics})
        try:
            final = ex.open(b.graph.final)  # from the driver's store: downloaded from the remote cache, checked
        except AccelcError as e:
            b.result = BuildResult(stages, None, e)
            return b.result
        b.result = BuildResult(stages, final)
        return b.result


def connect(address: str | None) -> Any:
    """``ray.init(address)`` unless this process is already connected; returns the ``ray`` module.

    ``address`` is a cluster's address (``ray://host:10001``, ``host:6379`` or ``auto``);
    ``None`` connects to ``$RAY_ADDRESS`` or starts a local Ray instance.

    Raises:
        AccelcError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as e:
        raise AccelcError("--executor ray needs Ray: pip install 'accelc[cluster]'") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return ray


def out_dirs_for(graphs: list[PassGraph], paths: list[str | Path], out: Path | None) -> list[Path]:
    """Each recipe's out dir: ``out`` for one recipe, ``out/<recipe file stem>`` for several (as the
    local executor does), ``build/<recipe name>`` by default."""
    if out is None:
        return [Path("build") / g.recipe.name for g in graphs]
    if len(graphs) == 1:
        return [out]
    return [out / Path(p).stem for p in paths]


def build_on_ray(
    recipe_paths: list[str | Path],
    target: str | None = None,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    cache_url: str | None = None,
    ray_address: str | None = None,
    reporter: Reporter | None = None,
    registry: Any = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> list[Any]:
    """Build several recipes at once on a Ray cluster; returns one ``BuildOutcome`` per recipe, in order.

    Each out dir gets what a local build writes there (final artifact, report.json with the
    node each stage ran on, report.md, accelc.lock). See :class:`RayBuilder` for the arguments.

    Raises:
        RecipeError, GraphError: before anything runs. AccelcError: Ray is missing. CacheError,
        OutputError: as :func:`accelc.build.build`. Build failures are in each outcome's ``result.failure``.
    """
    from .build import BuildOutcome, OutputError, _open_store, _publish, check_out_dir, prepare

    prepared = [prepare(p, target, registry) for p in recipe_paths]
    registry = prepared[0][1] if prepared else registry
    graphs = [g for g, _ in prepared]
    outs = out_dirs_for(graphs, list(recipe_paths), Path(out_dir) if out_dir else None)
    connect(ray_address)
    store = _open_store(cache_dir or default_root(), cache_url, reporter)
    builder = RayBuilder(graphs, registry, store, cache_url, reporter, max_retries)
    for out in outs:
        check_out_dir(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create out dir {out}: {e.strerror or e}") from e
    results = builder.run()
    outcomes = []
    for b, result, out in zip(builder.builds, results, outs, strict=True):
        report = _publish(b.executor, result, out)
        outcomes.append(BuildOutcome(report, out, result))
    return outcomes
