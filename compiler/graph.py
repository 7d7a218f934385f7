"""Lowering: recipe + target profile -> a typed pass graph, checked before anything runs.

The graph is a DAG whose nodes are pass invocations. Every node's input slots are
wired to upstream nodes by artifact kind (the most recent producer of an accepted
kind, or the first for ``source`` slots), so a pipeline is written as a plain list
of pass names. Lowering adds the nodes a recipe implies: loading the model and the
datasets, the reference outputs, ``verify`` after the chosen stages, and a final
``benchmark``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import GraphError
from .pass_api import RecipeView
from .recipe import Recipe, apply_defaults, schema_issues
from .runners import trial_runtime
from .targets import TargetProfile


@dataclass
class Node:
    """One pass invocation. ``inputs`` maps slot name -> upstream node id."""

    id: str
    pass_name: str
    options: dict[str, Any]
    inputs: dict[str, str]
    produces: str
    requires: tuple[str, ...]
    final: bool


@dataclass
class PassGraph:
    """Nodes in execution (topological) order, and the node whose output is deployed."""

    recipe: Recipe
    target: TargetProfile
    runtime: str
    nodes: list[Node]
    final: str
    by_id: dict[str, Node] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {n.id: n for n in self.nodes}

    def upstream(self, node_id: str) -> list[str]:
        """All transitive inputs of ``node_id`` (ids), nearest last."""
        seen: list[str] = []

        def walk(i: str) -> None:
            for up in self.by_id[i].inputs.values():
                if up not in seen:
                    walk(up)
                    seen.append(up)

        walk(node_id)
        return seen


def _unique_id(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    n = 2
    while f"{base}#{n}" in taken:
        n += 1
    return f"{base}#{n}"


def lower(recipe: Recipe, registry: Any) -> PassGraph:
    """Build and check the pass graph for ``recipe`` on its target.

    Each step's options are the runtime's defaults for its pass (``Runtime.pass_defaults``), then
    the step's own, then whatever the pass adds from the recipe in :meth:`Pass.configure`; they
    are validated against the pass's schema once, after that (the ``verify`` nodes lowering inserts
    go through ``configure`` too, starting from their stage's tolerances). Lowering itself never
    looks at a pass's name: it inserts ``verify`` after the verified stages and a final
    ``benchmark``, and wires slots by artifact kind. The default pipeline is the target's for the
    model source's ``family`` when it has one (:meth:`accelc.targets.TargetProfile.pipeline`).

    Raises:
        GraphError: the target cannot build this runtime/precision, a pipeline names an
            unknown pass or gives it invalid options, or a pass's input kind is produced
            by nothing upstream (the message names the pass, the slot and the kind).
    """
    target = registry.targets[recipe.target]
    runtime = recipe.runtime or target.default_runtime
    try:
        family = getattr(registry.model_sources.get(recipe.model.get("source")), "family", None)
        pipeline = target.pipeline(runtime, recipe.precision, family)
    except KeyError as e:
        raise GraphError(str(e.args[0])) from e
    steps = list(recipe.passes) if recipe.passes is not None else list(pipeline.steps)
    step_names = [s.name for s in steps]
    kinds = registry.kinds
    rt = registry.runtimes.get(runtime)
    runtime_defaults = rt.pass_defaults if rt is not None else {}

    verify_cfg = recipe.verify
    verify_batch = verify_cfg.get("batch_size", 16)
    explicit_verify = "verify" in step_names
    if verify_cfg.get("after") is not None:
        verify_after = list(verify_cfg["after"])
        unknown = [v for v in verify_after if v not in step_names]
        if unknown:
            raise GraphError(f"verify.after names {', '.join(unknown)}, which the pipeline does not run ({step_names})")
    else:
        verify_after = [v for v in pipeline.verify_after if v in step_names]
    if not verify_cfg.get("enabled", True) or explicit_verify or "validation" not in recipe.data:
        verify_after = []
    tolerances = dict(verify_cfg.get("tolerances", {}))
    stage_tol = verify_cfg.get("stages", {})
    stage_tolerances = {s: {**tolerances, **stage_tol.get(s, {})} for s in verify_after}
    if recipe.passes is None and verify_after and stage_tolerances[verify_after[-1]]:
        steps = pipeline.steps_for(verified=True)  # the target's accuracy-aware options (Pipeline.when_verified)

    def full_options(pass_name: str, options: dict[str, Any]) -> dict[str, Any]:
        p = registry.passes.get(pass_name)
        merged = {**runtime_defaults.get(pass_name, {}), **options}
        return apply_defaults(p.options_schema, merged) if p is not None else merged

    nodes: list[Node] = []
    taken: set[str] = set()

    def add(pass_name: str, options: dict[str, Any], node_id: str | None = None, where: str = "") -> Node:
        p = registry.passes.get(pass_name)
        if p is None:
            known = ", ".join(sorted(registry.passes))
            raise GraphError(f"{where or 'pipeline'}: unknown pass '{pass_name}' (known: {known})")
        opts = apply_defaults(p.options_schema, options)
        issues = schema_issues(p.options_schema, opts, f"{where or pass_name}")
        if issues:
            raise GraphError("invalid options: " + "; ".join(map(str, issues)))
        wired: dict[str, str] = {}
        requires = list(p.requires)
        # A pass may say which optional slots this invocation uses (``uses_inputs(options)``):
        # the others stay unwired (and out of its cache key), the named ones become required.
        uses = getattr(p, "uses_inputs", None)
        wanted = uses(opts) if callable(uses) else None
        for slot in p.inputs:
            if slot.optional and wanted is not None and slot.name not in wanted:
                continue
            producers = [n for n in nodes if slot.accepts(n.produces, kinds)]
            if not producers:
                if slot.optional and wanted is None:
                    continue
                first = slot.kinds[0] if slot.kinds else ""
                hint = kinds[first].missing_hint if first in kinds else ""
                accepted = " or ".join(slot.kinds) if slot.kinds else "any runnable kind"
                raise GraphError(
                    f"pass '{pass_name}' needs input '{slot.name}' of kind {accepted}, "
                    f"but no earlier pass produces one{hint}"
                )
            src = producers[0] if slot.source else producers[-1]
            wired[slot.name] = src.id
            kind = kinds.get(src.produces)
            if slot.runs and kind is not None:
                requires += [c for c in kind.requires if c not in requires]
                device_option = "device" in p.options_schema.get("properties", {})
                if kind.device_bound and target.device == "cuda" and device_option and "device" not in options:
                    opts["device"] = "cuda"
                    if "cuda" not in requires:
                        requires.append("cuda")
        if "cuda" in requires:  # a node on the GPU needs the target's GPU (an engine belongs to its device)
            requires += [c for c in target.capabilities if c not in requires]
        nid = _unique_id(node_id or pass_name, taken)
        taken.add(nid)
        node = Node(nid, pass_name, opts, wired, p.output_kind(opts), tuple(requires), p.final)
        nodes.append(node)
        return node

    add("load_model", dict(recipe.model), where="model")
    for role in ("calibration", "validation"):
        if role in recipe.data:
            spec = {"role": role, "spec": recipe.data[role]}
            add("load_data", spec, node_id=f"load_data[{role}]", where=f"data.{role}")
    if "validation" in recipe.data:
        add("reference", {"batch_size": verify_batch})

    benchmark = {k: v for k, v in recipe.benchmark.items() if k != "enabled"}

    def configured(pass_name: str, options: dict[str, Any], later: list[Any], where: str) -> dict[str, Any]:
        p = registry.passes.get(pass_name)
        if p is None:
            return options
        view = RecipeView(
            runtime=runtime,
            trial_runtime=trial_runtime(registry.runtimes, runtime),
            device=target.device,
            tolerances=tolerances,
            verify_batch_size=verify_batch,
            benchmark=benchmark,
            signature=recipe.signature,
            later=tuple(later),
            verified=tuple(verify_after),
            stage_tolerances_of=stage_tolerances,
            full_options=full_options,
            verify=dict(verify_cfg),
        )
        return p.configure(options, view, where)

    for i, step in enumerate(steps):
        where = f"passes[{i}].{step.name}" if recipe.passes is not None else f"target {target.name} pipeline"
        opts = configured(step.name, {**runtime_defaults.get(step.name, {}), **step.options}, steps[i + 1 :], where)
        node = add(step.name, opts, where=where)
        if step.name in verify_after:
            vid = f"verify[{node.id}]"
            vopts = {"tolerances": stage_tolerances[step.name], "batch_size": verify_batch}
            add("verify", configured("verify", vopts, steps[i + 1 :], vid), node_id=vid)

    if recipe.benchmark.get("enabled", True) and "benchmark" not in step_names:
        add("benchmark", configured("benchmark", dict(benchmark), [], "benchmark"), where="benchmark")

    finals = [n for n in nodes if n.final and n.produces in kinds and kinds[n.produces].runnable]
    if not finals:
        raise GraphError("the pipeline produces no deployable artifact")
    return PassGraph(recipe, target, runtime, nodes, finals[-1].id)


def unmet(graph: PassGraph, host: Any) -> dict[str, list[tuple[str, str]]]:
    """Node id -> capabilities this host lacks (with what was found), for every node that cannot run here.

    Without a CUDA device, compute-capability requirements (``sm==75``) are left out: ``cuda``
    already says it all."""
    out = {}
    for n in graph.nodes:
        missing = host.missing(n.requires)
        if any(c == "cuda" for c, _ in missing):
            missing = [(c, d) for c, d in missing if not c.startswith("sm")]
        if missing:
            out[n.id] = missing
    return out


