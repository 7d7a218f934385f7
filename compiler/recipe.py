"""Reading and validating recipes.

A recipe is YAML read with ``yaml.safe_load`` and validated with ``jsonschema``
(Draft 2020-12) in two layers: ``schemas/recipe.schema.json`` for the recipe's
shape, then the schema each model source, data source and pass publishes for its
own options. Every problem is reported at once, each with its JSON path
(``passes[3].calibrate.method``).

Hostile input is refused before it reaches any pass: files over :data:`MAX_RECIPE_BYTES`,
YAML aliases, explicit YAML tags (``!!python/object``...), nesting deeper than
:data:`MAX_DEPTH`, and values JSON cannot hold (non-string keys, dates, NaN or infinite
numbers). An ``integer`` in a schema is a whole number written as one (``3``, not ``3.0``).

Paths: relative paths are resolved against the recipe's directory and must stay inside
it (``../x`` is refused); a path outside it must be written as an absolute path, which
says so explicitly. Symlinks are followed as the filesystem has them.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from .errors import MAX_ECHO, RecipeError, SchemaIssue, cut
from .signature import InputSignature
from .sources import did_you_mean
from .targets import PassStep

#: Recipes are small; anything larger is refused before parsing.
MAX_RECIPE_BYTES = 1 << 20
#: Deepest nesting of mappings and sequences a recipe may have (real recipes use about 5).
MAX_DEPTH = 32
#: Explicit YAML tags a recipe may use: the JSON-compatible core types, nothing that constructs objects.
ALLOWED_TAGS = frozenset(
    {"!"} | {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}
)


def _is_strict_integer(checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


#: Draft 2020-12 with ``integer`` meaning an ``int`` (jsonschema also accepts ``3.0``, which
#: would then reach ``range()`` or a tensor shape as a float).
StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)


@dataclass
class Recipe:
    """A validated recipe, with defaults filled in and paths made absolute.

    ``passes`` is ``None`` when the recipe does not override the target's pipeline.
    """

    file: Path
    name: str
    model: dict[str, Any]
    signature: InputSignature
    target: str
    runtime: str | None
    precision: str
    data: dict[str, dict[str, Any]]
    passes: list[PassStep] | None
    verify: dict[str, Any]
    benchmark: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.file.parent


def json_path(parts: Any) -> str:
    """Format a jsonschema path deque as ``passes[3].calibrate.method`` (``(root)`` when empty)."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


def _issue(err: ValidationError, prefix: str = "") -> SchemaIssue:
    if err.context:  # oneOf/anyOf: the sub-error that went deepest says most
        err = best_match(err.context)
    path = list(err.absolute_path)
    message = err.message
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(err.schema.get("properties", {}))
        patterns = list(err.schema.get("patternProperties", {}))
        extra = [k for k in err.instance if k not in allowed and not any(re.search(p, str(k)) for p in patterns)]
        if len(extra) == 1:  # name the key itself: data.calibration.file, not data.calibration
            path.append(extra[0])
        unknown = "; ".join(f"unknown key '{k}'{did_you_mean(str(k), allowed)}" for k in extra)
        message = f"{unknown} (allowed here: {', '.join(allowed) or 'none'})"
    elif err.validator == "enum" and isinstance(err.instance, str):
        message += did_you_mean(err.instance, [str(v) for v in err.validator_value])
    where = json_path(path)
    shown = repr(err.instance)
    if len(shown) > MAX_ECHO and shown in message:  # jsonschema repeats the whole offending value
        message = message.replace(shown, cut(shown))
    if prefix:
        where = prefix if where == "(root)" else f"{prefix}.{where}" if not where.startswith("[") else prefix + where
    return SchemaIssue(cut(where, 200), cut(message, 400))


def schema_issues(schema: dict[str, Any], instance: Any, prefix: str = "") -> list[SchemaIssue]:
    """All violations of ``schema`` by ``instance``, paths prefixed with ``prefix``."""
    v = StrictValidator(schema)
    return [_issue(e, prefix) for e in sorted(v.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Return a copy of ``obj`` with ``default`` values from ``schema``'s ``properties`` filled in (recursively)."""
    if not isinstance(obj, dict) or schema.get("type") not in (None, "object"):
        return obj
    out = dict(obj)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out and isinstance(out[key], dict):
            out[key] = apply_defaults(sub, out[key])
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (YAML says keys are
    unique; PyYAML would keep the last one silently, so ``name:`` written twice would pick one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {cut(repr(key))} (first at line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file safely. Raises :class:`RecipeError` for a missing, huge or malformed file.

    Aliases are refused: they are rare in recipes and are how a few bytes of YAML expand
    into gigabytes ("billion laughs"). A key given twice in one mapping is refused, naming the
    key and both lines. Explicit tags other than the JSON-compatible core
    ones are refused, and so is nesting deeper than :data:`MAX_DEPTH`; both are checked on
    the event stream, before anything is constructed.
    """
    where = str(path)
    if not path.is_file():
        raise RecipeError(where, "file not found")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(where, f"file is {size} bytes; recipes are limited to {MAX_RECIPE_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(where, f"not UTF-8 text: {e}") from e
    except OSError as e:
        raise RecipeError(where, f"cannot read the file: {e.strerror or e}") from e
    if len(text.encode("utf-8")) > MAX_RECIPE_BYTES:  # the file grew after stat()
        raise RecipeError(where, f"file is over the {MAX_RECIPE_BYTES}-byte limit for recipes")

    def at(event: Any) -> str:
        mark = event.start_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: "

    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise RecipeError(where, f"YAML aliases (*{event.anchor}) are not allowed in recipes")
            tag = getattr(event, "tag", None)
            if tag is not None and tag not in ALLOWED_TAGS:
                raise RecipeError(
                    where, f"invalid YAML: {at(event)}tag {tag} is not allowed in recipes (plain data only)"
                )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeError(where, f"invalid YAML: {at(event)}nesting is deeper than {MAX_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(where, f"invalid YAML: {loc}{problem}") from e
    except RecursionError as e:
        raise RecipeError(where, "YAML nesting is too deep") from e


def plain_data_issues(obj: Any, where: str = "") -> list[SchemaIssue]:
    """Problems that make ``obj`` more than JSON data: non-string keys, values of other types
    (dates, bytes, sets), NaN or infinite numbers, nesting deeper than :data:`MAX_DEPTH`."""
    issues: list[SchemaIssue] = []

    def walk(o: Any, at: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            issues.append(SchemaIssue(at or "(root)", f"nesting is deeper than {MAX_DEPTH} levels"))
            return
        if isinstance(o, dict):
            for k, v in o.items():
                if not isinstance(k, str):
                    issues.append(
                        SchemaIssue(at or "(root)", f"key {k!r} is a {type(k).__name__}; keys must be strings")
                    )
                    continue
                walk(v, f"{at}.{k}" if at else k, depth + 1)
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, f"{at}[{i}]", depth + 1)
        elif isinstance(o, float) and not math.isfinite(o):
            issues.append(SchemaIssue(at or "(root)", f"{o} is not a finite number"))
        elif o is not None and not isinstance(o, (str, bool, int, float)):
            issues.append(
                SchemaIssue(
                    at or "(root)",
                    f"a {type(o).__name__} value ({str(o)[:40]!r}) is not plain data; quote it to make it a string",
                )
            )

    walk(obj, where, 0)
    return issues


def normalize_passes(items: list[Any]) -> list[PassStep]:
    """``["fuse_modules", {"calibrate": {"method": "entropy"}}]`` -> ``[PassStep, ...]``."""
    steps = []
    for item in items:
        if isinstance(item, str):
            steps.append(PassStep(item, {}))
        else:
            ((name, opts),) = item.items()
            steps.append(PassStep(name, dict(opts or {})))
    return steps


def _resolve_paths(
    options: dict[str, Any], keys: tuple[str, ...], base: Path, prefix: str, issues: list[SchemaIssue]
) -> dict[str, Any]:
    """A copy of ``options`` with the path options named by ``keys`` made absolute against ``base``.

    A relative path that leads out of ``base`` (``../data``) is reported in ``issues``: a
    path outside the recipe's directory must be written as an absolute path.
    """
    out = copy.deepcopy(options)
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        holder: Any = out
        for p in parents:
            holder = holder.get(p) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(leaf), str):
            value = holder[leaf]
            if "\0" in value:
                issues.append(SchemaIssue(f"{prefix}.{dotted}", "path contains a NUL character"))
                continue
            if not os.path.isabs(value):
                lexical = os.path.normpath(os.path.join(base, value))
                if os.path.commonpath([lexical, str(base)]) != str(base):
                    issues.append(
                        SchemaIssue(
                            f"{prefix}.{dotted}",
                            f"relative path '{value}' leads out of the recipe's directory {base}; "
                            "write a path outside it as an absolute path",
                        )
                    )
                    continue
            holder[leaf] = str((base / value).resolve())
    return out


def _package_resource_issues(model: dict[str, Any]) -> list[SchemaIssue]:
    """``model.weights.path`` names a file inside ``model.weights.package``: no ``..``, not absolute."""
    w = model.get("weights")
    if not isinstance(w, dict) or not isinstance(w.get("path"), str):
        return []
    parts = w["path"].replace("\\", "/").split("/")
    if os.path.isabs(w["path"]) or ".." in parts:
        return [SchemaIssue("model.weights.path", f"'{w['path']}' must be a path inside the package (no '..')")]
    return []


def _source_issues(source: Any, options: dict[str, Any], prefix: str) -> list[SchemaIssue]:
    """A source's :meth:`check` findings, each at its full JSON path (``data.calibration.images``)."""
    check = getattr(source, "check", None)
    if check is None:
        return []
    return [SchemaIssue(f"{prefix}.{key}", message) for key, message in check(options)]


def data_source_name(spec: dict[str, Any]) -> str:
    """The data source a dataset entry uses: explicit ``source``, else ``images``/``tensors`` by key."""
    if "source" in spec:
        return spec["source"]
    return "images" if "images" in spec else "tensors"


def load_recipe(path: str | Path, registry: Any, target_override: str | None = None) -> Recipe:
    """Read, validate and normalise a recipe.

    Raises:
        RecipeError: listing every problem, each with its JSON path, when the file is
            missing, not YAML, or violates the recipe schema or a plugin's options schema.
    """
    path = Path(path)
    where = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(where, f"the recipe must be a YAML mapping, got {type(raw).__name__}")
    from . import schemas_loader

    issues = plain_data_issues(raw)
    if issues:
        raise RecipeError(where, issues)
    issues = schema_issues(schemas_loader.recipe_schema(), raw)
    if issues:
        raise RecipeError(where, issues)
    base = path.parent.resolve()

    # second layer: each plugin-published options schema
    model_src = registry.model_sources.get(raw["model"]["source"])
    if model_src is None:
        issues.append(
            SchemaIssue(
                "model.source",
                f"unknown model source '{cut(raw['model']['source'])}'"
                f"{did_you_mean(raw['model']['source'], registry.model_sources)} "
                f"(known: {', '.join(sorted(registry.model_sources))})",
            )
        )
    else:
        issues += schema_issues(model_src.options_schema, raw["model"], "model")
        issues += _package_resource_issues(raw["model"])

    data: dict[str, dict[str, Any]] = {}
    for role, spec in (raw.get("data") or {}).items():
        name = data_source_name(spec)
        src = registry.data_sources.get(name)
        if src is None:
            known = ", ".join(sorted(registry.data_sources))
            issues.append(
                SchemaIssue(
                    f"data.{role}.source",
                    f"unknown data source '{cut(name)}'{did_you_mean(name, registry.data_sources)} (known: {known})",
                )
            )
            continue
        issues += schema_issues(src.options_schema, spec, f"data.{role}")
        data[role] = {"source": name, **spec}

    target_name = target_override or raw["target"]
    if target_name not in registry.targets:
        field_name = "--target" if target_override else "target"
        known = ", ".join(sorted(registry.targets))
        hint = did_you_mean(target_name, registry.targets)
        issues.append(SchemaIssue(field_name, f"unknown target '{cut(target_name)}'{hint} (known: {known})"))

    steps = normalize_passes(raw["passes"]) if "passes" in raw else None
    for i, step in enumerate(steps or []):
        p = registry.passes.get(step.name)
        if p is None:
            known = ", ".join(sorted(registry.passes))
            hint = did_you_mean(step.name, registry.passes)
            issues.append(SchemaIssue(f"passes[{i}]", f"unknown pass '{cut(step.name)}'{hint} (known: {known})"))
            continue
        issues += schema_issues(p.options_schema, step.options, f"passes[{i}].{step.name}")

    for i, inp in enumerate(raw["inputs"]):
        for j, d in enumerate(inp.get("dynamic", [])):
            at = f"inputs[{i}].dynamic[{j}]"
            if d["axis"] >= len(inp["shape"]):
                issues.append(SchemaIssue(f"{at}.axis", f"axis {d['axis']} is outside shape {inp['shape']}"))
            opt = d.get("opt", d["min"])
            if not d["min"] <= opt <= d["max"]:
                issues.append(SchemaIssue(at, f"need min <= opt <= max, got {d['min']}, {opt}, {d['max']}"))
            elif d["axis"] < len(inp["shape"]) and not d["min"] <= inp["shape"][d["axis"]] <= d["max"]:
                issues.append(
                    SchemaIssue(f"inputs[{i}].shape[{d['axis']}]", "example size is outside the dynamic range")
                )
    names = [i["name"] for i in raw["inputs"]]
    if len(set(names)) != len(names):
        issues.append(SchemaIssue("inputs", f"input names must be unique, got {names}"))

    # Paths are resolved and checked for every source whose options are valid, even when other
    # parts of the recipe have problems, so one validate round reports them all.
    def clean(prefix: str) -> bool:
        return not any(i.where == prefix or i.where.startswith((f"{prefix}.", f"{prefix}[")) for i in issues)

    model = raw["model"]
    model_ok = model_src is not None and clean("model")
    if model_ok:
        model = _resolve_paths(
            apply_defaults(model_src.options_schema, raw["model"]), model_src.path_options, base, "model", issues
        )
    data_ok = {role: clean(f"data.{role}") for role in data}
    for role, spec in data.items():
        if data_ok[role]:
            src = registry.data_sources[spec["source"]]
            data[role] = _resolve_paths(
                apply_defaults(src.options_schema, spec), src.path_options, base, f"data.{role}", issues
            )
    # what can be checked without running the user's code: files, folders, modules, model names
    if model_ok and clean("model"):
        issues += _source_issues(model_src, model, "model")
    for role, spec in data.items():
        if data_ok[role] and clean(f"data.{role}"):
            issues += _source_issues(registry.data_sources[spec["source"]], spec, f"data.{role}")
    rt = raw.get("runtime")
    tp = registry.targets.get(target_name)
    if rt is not None and tp is not None and rt not in tp.runtimes:
        issues.append(
            SchemaIssue(
                "runtime",
                f"target '{target_name}' has no runtime '{rt}'{did_you_mean(rt, tp.runtimes)} "
                f"(its runtimes: {', '.join(tp.runtimes)})",
            )
        )
    if issues:
        raise RecipeError(where, issues)
    if steps is not None:
        steps = [PassStep(s.name, apply_defaults(registry.passes[s.name].options_schema, s.options)) for s in steps]

    return Recipe(
        file=path.resolve(),
        name=raw["name"],
        model=model,
        signature=InputSignature.from_json(raw["inputs"]),
        target=target_name,
        runtime=raw.get("runtime"),
        precision=raw["precision"],
        data=data,
        passes=steps,
        verify=apply_defaults(schemas_loader.recipe_schema()["properties"]["verify"], raw.get("verify", {})),
        benchmark=raw.get("benchmark", {}),
        raw=raw,
    )
