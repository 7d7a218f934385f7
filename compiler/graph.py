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

from .artifacts import RUNNABLE_KINDS
from .errors import GraphError
from .recipe import Recipe, apply_defaults, schema_issues
from .targets import TargetProfile

#: Extra host capabilities needed to *execute* an artifact kind (for verify and benchmark).
KIND_REQUIRES: dict[str, tuple[str, ...]] = {"trt.engine": ("cuda", "tensorrt"), "runtime.config": ("cuda",)}


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

    Raises:
        GraphError: the target cannot build this runtime/precision, a pipeline names an
            unknown pass or gives it invalid options, or a pass's input kind is produced
            by nothing upstream (the message names the pass, the slot and the kind).
    """
    target = registry.targets[recipe.target]
    runtime = recipe.runtime or target.default_runtime
    try:
        pipeline = target.pipeline(runtime, recipe.precision)
    except KeyError as e:
        raise GraphError(str(e.args[0])) from e
    steps = list(recipe.passes) if recipe.passes is not None else list(pipeline.steps)
    step_names = [s.name for s in steps]

    verify_cfg = recipe.verify
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

    nodes: list[Node] = []
    taken: set[str] = set()

    def add(pass_name: str, options: dict[str, Any], node_id: str | None = None, where: str = "") -> Node:
        p = registry.passes.get(pass_name)
        if p is None:
            raise GraphError(f"{where or 'pipeline'}: unknown pass '{pass_name}' (known: {', '.join(sorted(registry.passes))})")
        opts = apply_defaults(p.options_schema, options)
        issues = schema_issues(p.options_schema, opts, f"{where or pass_name}")
        if issues:
            raise GraphError("invalid options: " + "; ".join(map(str, issues)))
        wired: dict[str, str] = {}
        requires = list(p.requires)
        for slot in p.inputs:
            producers = [n for n in nodes if n.produces in slot.kinds]
            if not producers:
                if slot.optional:
                    continue
                hint = {
                    "calibration.data": " (add data.calibration to the recipe)",
                    "validation.data": " (add data.validation to the recipe)",
                    "reference.outputs": " (add data.validation to the recipe)",
                }.get(slot.kinds[0], "")
                raise GraphError(
                    f"pass '{pass_name}' needs input '{slot.name}' of kind {' or '.join(slot.kinds)}, "
                    f"but no earlier pass produces one{hint}"
                )
            src = producers[0] if slot.source else producers[-1]
            wired[slot.name] = src.id
            for cap in KIND_REQUIRES.get(src.produces, ()):
                if cap not in requires and pass_name in ("verify", "benchmark", "cuda_graph"):
                    requires.append(cap)
        nid = _unique_id(node_id or pass_name, taken)
        taken.add(nid)
        node = Node(nid, pass_name, opts, wired, p.output_kind(opts), tuple(requires), p.final)
        nodes.append(node)
        return node

    add("load_model", dict(recipe.model), where="model")
    for role in ("calibration", "validation"):
        if role in recipe.data:
            add("load_data", {"role": role, "spec": recipe.data[role]}, node_id=f"load_data[{role}]", where=f"data.{role}")
    if "validation" in recipe.data:
        add("reference", {"batch_size": verify_cfg.get("batch_size", 16)})

    tolerances = dict(verify_cfg.get("tolerances", {}))
    stage_tol = verify_cfg.get("stages", {})
    for i, step in enumerate(steps):
        where = f"passes[{i}].{step.name}" if recipe.passes is not None else f"target {target.name} pipeline"
        opts = dict(step.options)
        if step.name == "verify":
            opts.setdefault("tolerances", tolerances)
        if step.name == "benchmark":
            opts = {**recipe.benchmark, **opts}
            opts.pop("enabled", None)
        node = add(step.name, opts, where=where)
        if step.name in verify_after:
            tol = {**tolerances, **stage_tol.get(step.name, {})}
            add("verify", {"tolerances": tol, "batch_size": verify_cfg.get("batch_size", 16)}, node_id=f"verify[{node.id}]")

    if recipe.benchmark.get("enabled", True) and "benchmark" not in step_names:
        opts = {k: v for k, v in recipe.benchmark.items() if k != "enabled"}
        add("benchmark", opts, where="benchmark")

    finals = [n for n in nodes if n.final and n.produces in RUNNABLE_KINDS]
    if not finals:
        raise GraphError("the pipeline produces no deployable artifact")
    return PassGraph(recipe, target, runtime, nodes, finals[-1].id)


def unmet(graph: PassGraph, host: Any) -> dict[str, list[tuple[str, str]]]:
    """Node id -> capabilities this host lacks (with what was found), for every node that cannot run here."""
    out = {}
    for n in graph.nodes:
        missing = host.missing(n.requires)
        if missing:
            out[n.id] = missing
    return out


