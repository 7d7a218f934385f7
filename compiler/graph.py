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
from .runners import ONNX_RUNTIMES
from .targets import TargetProfile

#: Extra host capabilities needed to *execute* an artifact kind (for verify and benchmark).
KIND_REQUIRES: dict[str, tuple[str, ...]] = {
    "trt.engine": ("cuda", "tensorrt"),
    "runtime.config": ("cuda",),
    "openvino.ir": ("openvino",),
}
#: Quantize format options a runtime wants unless the recipe sets them: OpenVINO runs the
#: producer of a float node's input as an INT8 kernel with a float output when no Q/DQ pair
#: sits in between (see the quantize option ``float_node_inputs``).
RUNTIME_QUANTIZE_DEFAULTS: dict[str, dict[str, Any]] = {"openvino": {"float_node_inputs": "float"}}
#: Kinds that verify and benchmark run on a GPU target's device (its ONNX stages stay on
#: ONNX Runtime's CPU provider: they check the graph, not the deployed runtime).
DEVICE_KINDS = ("torch.module", "torchscript", "torch.exported", "trt.engine", "runtime.config")


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
        family = getattr(registry.model_sources.get(recipe.model.get("source")), "family", None)
        pipeline = target.pipeline(runtime, recipe.precision, family)
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
            producers = [n for n in nodes if n.produces in slot.kinds]
            if not producers:
                if slot.optional and wanted is None:
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
            on_gpu = target.device == "cuda" and src.produces in DEVICE_KINDS and "device" not in options
            if pass_name in ("verify", "benchmark") and slot.name == "artifact" and on_gpu:
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
        add("reference", {"batch_size": verify_cfg.get("batch_size", 16)})

    tolerances = dict(verify_cfg.get("tolerances", {}))
    stage_tol = verify_cfg.get("stages", {})
    for i, step in enumerate(steps):
        where = f"passes[{i}].{step.name}" if recipe.passes is not None else f"target {target.name} pipeline"
        opts = dict(step.options)
        if step.name == "verify":
            opts.setdefault("tolerances", tolerances)
        if step.name in ("calibrate", "quantize"):
            opts = _accuracy_options(step.name, opts, steps[i + 1 :], verify_after, tolerances, stage_tol,
                                     verify_cfg.get("batch_size", 16), registry, where, runtime)
        if step.name == "benchmark":
            opts = {**recipe.benchmark, **opts}
            opts.pop("enabled", None)
        if step.name == "cuda_graph" and "batch_sizes" not in opts:
            opts["batch_sizes"] = _graph_batch_sizes(recipe)
        node = add(step.name, opts, where=where)
        if step.name in verify_after:
            tol = {**tolerances, **stage_tol.get(step.name, {})}
            vopts = {"tolerances": tol, "batch_size": verify_cfg.get("batch_size", 16)}
            vopts.update({k: verify_cfg[k] for k in ("output", "recall_k", "degenerate") if k in verify_cfg})
            add("verify", vopts, node_id=f"verify[{node.id}]")

    if recipe.benchmark.get("enabled", True) and "benchmark" not in step_names:
        opts = {k: v for k, v in recipe.benchmark.items() if k != "enabled"}
        add("benchmark", opts, where="benchmark")

    finals = [n for n in nodes if n.final and n.produces in RUNNABLE_KINDS]
    if not finals:
        raise GraphError("the pipeline produces no deployable artifact")
    return PassGraph(recipe, target, runtime, nodes, finals[-1].id)


def _graph_batch_sizes(recipe: Recipe) -> list[int]:
    """The batch sizes ``cuda_graph`` captures by default: the example batch and the benchmark's
    batch sizes that fit the dynamic batch range (a static batch: the example batch only)."""
    spec = recipe.signature.inputs[0]
    d = spec.batch_dim()
    if d is None:
        return [spec.shape[0]]
    wanted = [spec.shape[0], *recipe.benchmark.get("batch_sizes", [])]
    return sorted({b for b in wanted if d.min <= b <= d.max})


def _accuracy_options(name: str, opts: dict[str, Any], later: list[Any], verify_after: list[str],
                      tolerances: dict[str, Any], stage_tol: dict[str, Any], batch_size: int, registry: Any,
                      where: str, runtime: str = "onnxruntime") -> dict[str, Any]:
    """Options of the accuracy-aware INT8 passes that come from the rest of the recipe.

    * ``quantize`` with ``fallback`` set (``auto`` or ``off``) gets the quantize stage's tolerances
      (those of the first verified stage from quantize on: ``openvino_ir`` when the QDQ model is
      verified only as the runtime's IR) and the verify batch size, so it can check itself and, with
      ``auto``, search the nodes to keep in float. The tolerances stay in its cache key: they
      decide which nodes are excluded. Without ``fallback`` nothing is added: verify alone checks
      the stage.
    * ``calibrate`` with ``method: auto`` gets ``selection``: the format options of the next
      ``quantize`` step (to quantize each trial like the build will) and that stage's tolerances.
    * ``quantize`` (and so calibrate's ``selection.quantize``) gets the format defaults of
      :data:`RUNTIME_QUANTIZE_DEFAULTS` for the recipe's runtime where the recipe left them unset.
    * Both get ``runtime``: the recipe's runtime when it runs ONNX files itself
      (:data:`accelc.runners.ONNX_RUNTIMES`, e.g. ``openvino``), so the trials are scored on
      what deploys them; ONNX Runtime otherwise (a TensorRT build scores its QDQ graph there).
    """
    trial_runtime = runtime if runtime in ONNX_RUNTIMES else "onnxruntime"

    def stage_tolerances(step: str) -> dict[str, Any]:
        # the first verified stage from ``step`` on: ``step`` itself, or the stage that puts its
        # output in the runtime's own format (openvino_ir after quantize)
        for s in [step, *(s.name for s in later)]:
            if s in verify_after:
                return {**tolerances, **stage_tol.get(s, {})}
        return {}

    if name == "quantize":
        opts = {**RUNTIME_QUANTIZE_DEFAULTS.get(runtime, {}), **opts}
        if not opts.get("fallback"):
            return opts  # plain quantization: verify alone checks it, and a tolerance change reruns nothing
        tol = stage_tolerances("quantize")
        if tol:
            opts.setdefault("tolerances", tol)
            opts.setdefault("batch_size", batch_size)
        elif not opts.get("tolerances"):
            raise GraphError(
                f"{where}: quantize.fallback '{opts['fallback']}' needs the quantize stage's tolerances, but that "
                "stage is not verified (add data.validation, keep 'quantize' in verify.after, set verify.tolerances)"
            )
        opts.setdefault("runtime", trial_runtime)
        return opts
    if opts.get("method") != "auto":
        return opts
    q = next((s for s in later if s.name == "quantize"), None)
    qpass = registry.passes.get("quantize")
    cpass = registry.passes.get("calibrate")
    fmt: dict[str, Any] = {}
    if q is not None and qpass is not None and cpass is not None:
        allowed = cpass.options_schema["properties"]["selection"]["properties"]["quantize"]["properties"]
        full = apply_defaults(qpass.options_schema, {**RUNTIME_QUANTIZE_DEFAULTS.get(runtime, {}), **q.options})
        fmt = {k: v for k, v in full.items() if k in allowed}
    selection = {"quantize": fmt, "tolerances": stage_tolerances("quantize") or dict(tolerances),
                 "batch_size": batch_size, "runtime": trial_runtime, **opts.get("selection", {})}
    return {**opts, "selection": selection}


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


