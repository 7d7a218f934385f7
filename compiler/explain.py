"""Why a node reruns, in the recipe's own field names (``verify.tolerances.cosine``, not ``selection``).

A node's key material holds its options as lowering completed them: some the recipe wrote under
``passes`` (or the target's default pipeline supplied), some lowering copied in from elsewhere in
the recipe (``verify``, ``benchmark``, ``runtime``, a later step's options). :func:`recipe_field`
maps a changed option back to where the user writes it; :func:`changed_fields` lists them.
"""

from __future__ import annotations

from typing import Any

#: Options a pass receives from lowering, by where the recipe sets them (``{stage}``: the verified stage).
_LOWERED = {
    "tolerances": "verify.tolerances{rest} (or verify.stages.{stage}{rest})",
    "runtime": "runtime",
    "selection.tolerances": "verify.tolerances{rest} (or verify.stages.quantize{rest})",
    "selection.batch_size": "verify.batch_size",
    "selection.runtime": "runtime",
    "selection.latency_iterations": "{step}.selection.latency_iterations",
}


def changed_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two JSON-like values (lists compared whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_paths(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if old != new else []


def _step_ref(recipe: Any, pass_name: str, occurrence: int = 0) -> str:
    """``passes[3].calibrate`` when the recipe lists passes, else ``calibrate (target pipeline)``."""
    if recipe is not None and getattr(recipe, "passes", None) is not None:
        idx = [i for i, s in enumerate(recipe.passes) if s.name == pass_name]
        if len(idx) > occurrence:
            return f"passes[{idx[occurrence]}].{pass_name}"
    return f"{pass_name} (target's default pipeline)"


def recipe_field(node: Any, path: str, recipe: Any = None) -> str:
    """Where the recipe sets the key material ``path`` of ``node`` (``material.options.method`` of
    ``calibrate`` -> ``passes[3].calibrate.method``)."""
    pass_name = node.pass_name
    if pass_name == "load_model":
        sub = path.removeprefix("identity.").removeprefix("material.identity.")
        if sub.startswith("code_sha256"):
            return "the model's code (model.callable's module)"
        if sub.startswith("weights.sha256"):
            return "model.weights (file contents)"
        return f"model.{sub.removeprefix('material.')}"
    if pass_name == "load_data":
        role = (getattr(node, "options", {}) or {}).get("role", "?")
        sub = path.removeprefix("material.").removeprefix("identity.")
        if sub in ("sha256", "images_sha256"):
            key = "images" if sub == "images_sha256" else "tensors"
            return f"data.{role}.{key} (file contents)"
        if sub == "labels_sha256":
            return f"data.{role}.labels (file contents)"
        return f"data.{role}.{sub}"
    opt = path.removeprefix("material.").removeprefix("options.")
    if path.startswith("material.host") or path.startswith("host"):
        return "this host (" + opt.removeprefix("host.") + ")"
    if pass_name == "benchmark":
        return f"benchmark.{opt}"
    if pass_name in ("verify", "reference"):
        stage = node.id[len("verify[") : -1] if node.id.startswith("verify[") else ""
        if opt.startswith("tolerances"):
            rest = opt.removeprefix("tolerances").lstrip(".")
            return f"verify.tolerances.{rest} (or verify.stages.{stage}.{rest})" if rest else "verify.tolerances"
        return f"verify.{opt}"
    step = _step_ref(recipe, pass_name)
    if opt.startswith("selection.quantize"):
        return f"{_step_ref(recipe, 'quantize')}.{opt.removeprefix('selection.quantize.')}"
    for prefix, where in _LOWERED.items():
        if opt == prefix or opt.startswith(prefix + "."):
            rest = opt[len(prefix) :]
            return where.format(stage=pass_name, step=step, rest=rest)
    if opt in ("batch_size",) and pass_name == "quantize":
        return "verify.batch_size"
    return f"{step}.{opt}"


def changed_fields(node: Any, old: Any, new: Any, recipe: Any = None) -> list[str]:
    """The recipe fields behind every changed leaf of a node's key material, in order, without repeats."""
    out: list[str] = []
    paths = changed_paths(old, new)
    # an option that changed explains the ones lowering added or dropped because of it
    # (calibrate method auto -> percentile drops candidates and selection)
    both = [p for p in paths if _has(old, p) and _has(new, p)]
    for p in both or paths:
        f = recipe_field(node, p, recipe)
        if f not in out:
            out.append(f)
    return out


def _has(doc: Any, path: str) -> bool:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return False
        doc = doc[part]
    return True
