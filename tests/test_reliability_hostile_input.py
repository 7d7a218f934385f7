"""Hostile and broken input: each refused with a clear message and a non-zero exit, and nothing
written to the cache (for a failure found while a source loads, nothing derived from the bad input:
the model loaded before the data failed is a valid entry and stays).

How the mechanisms were checked to fail without them (each by mutating a copy of the package):

* ``plain_data_issues``: without it ``.nan`` is accepted as a tolerance (every comparison with
  NaN is false, so the tolerance would never fail), and dates and non-string keys reach the
  cache-key JSON;
* strict integers: with jsonschema's default ``integer`` (which accepts ``3.0``), ``3.0`` is accepted;
* paths: without the check in ``_resolve_paths``, ``../`` paths resolve outside the recipe dir, and
  a NUL byte crashed ``Path.resolve`` with a ``ValueError`` traceback (found by the property test);
* plugin output checks: without ``format_problem``, a pass declaring ``onnx`` that writes anything
  else is committed and deployed;
* the property test: with ``read_yaml`` no longer turning ``yaml.YAMLError`` into ``RecipeError``,
  it fails on the first malformed document.

The tag and depth checks on the YAML event stream make the message name the line and the tag;
without them these files were still refused (by ``safe_load`` and a caught ``RecursionError``),
with vaguer messages.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from accelc.build import build
from accelc.cli import main
from accelc.errors import PassError, PluginError, RecipeError
from accelc.pass_api import Pass, PassResult, Slot
from accelc.plugins.hookspecs import hookimpl
from accelc.plugins.manager import make_plugin_manager
from accelc.recipe import load_recipe
from accelc.registry import build_registry, default_registry
from accelc.schemas_loader import recipe_schema


def cli_build(recipe: Path, tmp: Path) -> Any:
    """``accelc build`` in process; returns the click result."""
    return CliRunner().invoke(
        main, ["build", str(recipe), "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "out")]
    )


def cache_contents(cache: Path) -> tuple[list[str], list[str]]:
    """(nodes of committed entries, leftover staging dirs)."""
    if not cache.exists():
        return [], []
    nodes = []
    for e in (cache / "entries").iterdir():
        meta = e / "meta.json"
        nodes.append(yaml.safe_load(meta.read_text())["node"] if meta.exists() else f"?{e.name}")
    return sorted(nodes), sorted(p.name for p in (cache / "tmp").iterdir())


# -- recipe files -------------------------------------------------------------------------------

BAD_RECIPES = {
    "malformed": ("name: [unclosed\n", "invalid YAML: line"),
    "huge": ("name: tiny\n" + "# padding\n" * 120_000, "limited to"),
    "object tag": ("name: !!python/object/apply:os.system ['touch {marker}']\n", "tag tag:yaml.org,2002:python"),
    "local tag": ("name: !shell x\n", "is not allowed"),
    "aliases": ("a: &a [1, 2]\nb: [*a, *a]\n", "aliases"),
    "deep nesting": ("name: " + "[" * 1000 + "]" * 1000 + "\n", "deeper than"),
    "not a mapping": ("- just\n- a list\n", "must be a YAML mapping"),
    "not utf-8": (b"name: \xff\xfe\n", "not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_files_are_refused_before_anything_runs(case, tmp_path):
    text, message = BAD_RECIPES[case]
    recipe = tmp_path / "r.yaml"
    marker = tmp_path / "pwned"
    if isinstance(text, bytes):
        recipe.write_bytes(text)
    else:
        recipe.write_text(text.replace("{marker}", str(marker)))
    r = cli_build(recipe, tmp_path)
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output
    assert not marker.exists()
    assert cache_contents(tmp_path / "cache") == ([], [])


def _recipe_with(project, tmp: Path, **over: Any) -> Path:
    return project.write_recipe(tmp, "r", **over)


BAD_VALUES = {
    "wrong type": (dict(inputs=[{"name": "input", "shape": ["a", 3, 32, 32]}]), "inputs[0].shape[0]"),
    "integral float": (dict(benchmark={"iterations": 3.0}), "benchmark.iterations"),
    "nan tolerance": (
        dict(verify={"tolerances": {"cosine": math.nan}}),
        "verify.tolerances.cosine: nan is not a finite",
    ),
    "infinite": (dict(verify={"tolerances": {"max_abs_error": math.inf}}), "is not a finite number"),
    "unknown top-level key": (dict(optimise_harder=True), "optimise_harder"),
    "unknown model option": (dict(model={"source": "python", "callable": "m:f", "colour": "red"}), "colour"),
    "unknown data option": (dict(data={"calibration": {"tensors": "x.npz", "shuffle": True}}), "data.calibration"),
    "unknown pass option": (dict(passes=[{"export_onnx": {"opset": 18, "turbo": 1}}]), "passes[0].export_onnx"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_wrong_values_are_refused_with_their_json_path(case, reliability_project, tmp_path):
    over, where = BAD_VALUES[case]
    r = cli_build(_recipe_with(reliability_project, tmp_path, **over), tmp_path)
    assert r.exit_code == 2 and where in r.output, r.output
    assert cache_contents(tmp_path / "cache") == ([], [])


@pytest.mark.parametrize(
    "text, where",
    [
        ("created: 2024-01-01\n", "a date value"),
        ("1: one\n", "keys must be strings"),
        ("model: {kwargs: {width: !!binary aGk=}}\n", "tag tag:yaml.org,2002:binary"),
        ("model: {kwargs: !!set {a, b}}\n", "tag tag:yaml.org,2002:set"),
    ],
)
def test_values_that_are_not_plain_data_are_refused(text, where, reliability_project, tmp_path):
    doc = yaml.safe_dump(reliability_project.recipe_dict()) + text
    if text.startswith("model:"):  # merge into the existing model mapping
        doc = doc.replace("model:\n", "model:\n  kwargs: PLACEHOLDER\n", 1)
        doc = doc.replace("  kwargs: PLACEHOLDER\n", "  kwargs: " + text.split("kwargs: ", 1)[1].rstrip("}\n") + "\n")
    (tmp_path / "r.yaml").write_text(doc)
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml", default_registry())
    assert where in str(e.value)


@pytest.mark.parametrize(
    "over, where",
    [
        (dict(data={"calibration": {"tensors": "../outside.npz"}}), "data.calibration.tensors"),
        (dict(data={"calibration": {"images": "photos/../../elsewhere"}}), "data.calibration.images"),
        (dict(model={"source": "python", "callable": "m:f", "weights": {"file": "../../w.pt"}}), "model.weights.file"),
        (dict(model={"source": "python", "callable": "m:f", "path": ".."}), "model.path"),
        (
            dict(
                model={
                    "source": "torchvision",
                    "name": "resnet18",
                    "weights": {"package": "torchvision", "path": "../../etc/passwd"},
                }
            ),
            "model.weights.path",
        ),
        (dict(data={"calibration": {"tensors": "cal\x00.npz"}}), "data.calibration.tensors"),  # crashed realpath()
    ],
)
def test_paths_that_leave_the_recipe_dir_or_are_not_paths_are_refused(over, where, reliability_project, tmp_path):
    recipe = _recipe_with(reliability_project, tmp_path / "project", **over)
    r = cli_build(recipe, tmp_path)
    assert r.exit_code == 2 and where in r.output, r.output
    assert any(m in r.output for m in ("leads out of the recipe's directory", "inside the package", "NUL"))
    assert cache_contents(tmp_path / "cache") == ([], [])


def test_paths_inside_the_recipe_dir_or_absolute_are_accepted(reliability_project, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cal.npz").touch()  # validation checks that a named file exists
    recipe = _recipe_with(
        reliability_project,
        tmp_path,
        data={
            "calibration": {"tensors": "data/../data/cal.npz"},  # stays inside
            "validation": {"tensors": str(reliability_project.root / "val.npz")},  # outside, but absolute
        },
    )
    r = load_recipe(recipe, default_registry())
    assert r.data["calibration"]["tensors"] == str((tmp_path / "data" / "cal.npz").resolve())


# -- broken model and data files ----------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["pickle that runs code", "random bytes", "tensor not a state_dict"])
def test_checkpoints_that_are_not_tensor_state_dicts_are_refused(kind, reliability_project, tmp_path):
    import torch

    weights, marker = tmp_path / "w.pt", tmp_path / "pwned"
    if kind == "pickle that runs code":
        weights.write_bytes(pickle.dumps({"conv1.weight": _RunsCode(marker)}, protocol=2))
    elif kind == "random bytes":
        weights.write_bytes(os.urandom(256))
    else:
        torch.save(torch.zeros(3), weights)
    model = {**reliability_project.recipe_dict()["model"], "weights": {"file": "w.pt"}}
    r = cli_build(_recipe_with(reliability_project, tmp_path, model=model), tmp_path)
    assert r.exit_code == 2 and "model.weights" in r.output, r.output
    assert not marker.exists()
    assert cache_contents(tmp_path / "cache") == ([], [])


def _images_recipe(project, tmp: Path, folder: Path) -> Path:
    return _recipe_with(
        project,
        tmp,
        data={
            "calibration": {"images": str(folder), "preprocess": {"resize": 32, "crop": 32}},
            "validation": {"tensors": str(project.root / "val.npz")},
        },
    )


def test_images_that_cannot_be_decoded_are_refused(reliability_project, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + os.urandom(64))
    r = cli_build(_images_recipe(reliability_project, tmp_path, folder), tmp_path)
    assert r.exit_code == 2 and "cannot decode" in r.output and "cat.jpg" in r.output, r.output
    nodes, staging = cache_contents(tmp_path / "cache")
    assert nodes == ["load_model"] and staging == []  # the model loaded first is valid; no data entry


def test_empty_data_folder_is_refused(reliability_project, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "README.txt").write_text("no images here")
    r = cli_build(_images_recipe(reliability_project, tmp_path, folder), tmp_path)
    assert r.exit_code == 2 and "holds no images" in r.output, r.output
    assert cache_contents(tmp_path / "cache") == ([], [])


# -- plugins ------------------------------------------------------------------------------------


def _broken_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Relu", ["not_defined_anywhere"], ["y"])
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y])), str(path))


class _OnnxPass(Pass):
    inputs = (Slot("model", ("onnx",)),)
    produces = "onnx"


class EmitsBrokenOnnx(_OnnxPass):
    name = "emits_broken_onnx"

    def run(self, ctx, inputs, options):
        _broken_onnx(ctx.workdir / "model.onnx")
        return PassResult("model.onnx")


class EmitsTorchFileAsOnnx(_OnnxPass):
    name = "emits_torch_as_onnx"

    def run(self, ctx, inputs, options):
        import torch

        torch.save({"w": torch.zeros(2)}, ctx.workdir / "model.onnx")
        return PassResult("model.onnx")


class ClaimsAnotherKind(_OnnxPass):
    name = "claims_another_kind"

    def run(self, ctx, inputs, options):
        (ctx.workdir / "model.onnx").write_bytes(inputs["model"].file.read_bytes())
        result = PassResult("model.onnx")
        result.kind = "torch.module"  # type: ignore[attr-defined]
        return result


class ReturnsAPath(_OnnxPass):
    name = "returns_a_path"

    def run(self, ctx, inputs, options):
        (ctx.workdir / "model.onnx").write_bytes(inputs["model"].file.read_bytes())
        return ctx.workdir / "model.onnx"


class PointsOutsideWorkdir(_OnnxPass):
    name = "points_outside_workdir"

    def run(self, ctx, inputs, options):
        return PassResult("../../entries/model.onnx")


class Raises(_OnnxPass):
    name = "raises"

    def run(self, ctx, inputs, options):
        raise ZeroDivisionError("oops")


class AcmePlugin:
    """A third-party plugin whose passes break the contract in different ways."""

    @hookimpl
    def accelc_register_passes(self):
        return [EmitsBrokenOnnx, EmitsTorchFileAsOnnx, ClaimsAnotherKind, ReturnsAPath, PointsOutsideWorkdir, Raises]


@pytest.fixture(scope="module")
def acme_registry():
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(AcmePlugin(), name="acme")
    return build_registry(pm)


@pytest.mark.parametrize(
    "pass_name, error, message",
    [
        ("emits_broken_onnx", PluginError, "fails onnx.checker"),
        ("emits_torch_as_onnx", PluginError, "declares output kind 'onnx', but its model.onnx"),
        ("claims_another_kind", PluginError, "kind 'torch.module', but declares 'onnx'"),
        ("returns_a_path", PluginError, "not a PassResult"),
        ("points_outside_workdir", PluginError, "not a relative path inside its workdir"),
        ("raises", PassError, "ZeroDivisionError: oops"),
    ],
)
def test_plugin_pass_that_breaks_the_contract_is_named_and_not_cached(
    pass_name, error, message, acme_registry, reliability_project, reliability_warm_cache, tmp_path
):
    recipe = _recipe_with(
        reliability_project,
        tmp_path,
        passes=["fuse_modules", "export_onnx", pass_name],
        verify={"enabled": False},
        benchmark={"enabled": False},
    )
    before, _ = cache_contents(reliability_warm_cache)
    outcome = build(recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache, registry=acme_registry)
    err = outcome.result.failure
    assert isinstance(err, error) and err.exit_code != 0, err
    assert "plugin 'acme'" in str(err) and message in str(err), str(err)
    assert cache_contents(reliability_warm_cache) == (before, [])
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_plugin_whose_hook_raises_is_named():
    class Broken:
        @hookimpl
        def accelc_register_targets(self):
            raise RuntimeError("config file missing")

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(Broken(), name="acme_targets")
    with pytest.raises(PluginError, match="plugin 'acme_targets': hook accelc_register_targets raised RuntimeError"):
        build_registry(pm)


# -- property: validation accepts only schema-valid recipes, or raises RecipeError -------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "int8",
            "fp32",
            "cpu",
            "t4",
            "python",
            "images",
            "tensors",
            "export_onnx",
            "../x",
            "/abs/path",
            "m:f",
            "calibrate",
            "entropy",
            "x" * 200,
            "cal\x00.npz",
        ]
    )
)
_values = st.recursive(
    _scalars | st.dates() | st.binary(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(0, 3), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _tweak(value: Any) -> st.SearchStrategy:
    """Values of the same JSON type as ``value``: near misses that only the schema's bounds catch."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-3, 70000) | st.sampled_from([0, 1, 7, 8, 9, 13, 23, 24, 4096, 65536, 65537])
    if isinstance(value, float):
        return st.floats(-2, 2) | st.floats()
    if isinstance(value, str):
        return _scalars.filter(lambda v: isinstance(v, str))
    if isinstance(value, list):
        return st.lists(st.sampled_from(value), max_size=len(value) + 1) if value else st.just([])
    if isinstance(value, dict) and value:
        return st.dictionaries(st.sampled_from(list(value)), _values, max_size=2).map(lambda extra: {**value, **extra})
    return _values


def _mutate(doc: Any, path: tuple, op: str, value: Any, key: Any) -> Any:
    if not path:
        return value if op == "replace" else doc
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if op in ("replace", "tweak"):
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    elif isinstance(parent[last], list):
        parent[last].append(value)
    return doc


def _schema_valid(raw: Any, registry: Any) -> bool:
    """Independent check with jsonschema's own validator: the recipe and every plugin schema it names."""
    ok = Draft202012Validator(recipe_schema()).is_valid(raw)
    ok = ok and Draft202012Validator(registry.model_sources[raw["model"]["source"]].options_schema).is_valid(
        raw["model"]
    )
    for spec in (raw.get("data") or {}).values():
        name = spec.get("source") or ("images" if "images" in spec else "tensors")
        ok = ok and Draft202012Validator(registry.data_sources[name].options_schema).is_valid(spec)
    for item in raw.get("passes", []):
        name, opts = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        ok = ok and Draft202012Validator(registry.passes[name].options_schema).is_valid(opts or {})
    return ok


@pytest.fixture(scope="module")
def property_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("recipe_property")


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_validation_accepts_only_schema_valid_recipes_or_raises_recipe_error(data, reliability_project, property_dir):
    registry = default_registry()
    doc = reliability_project.recipe_dict(passes=["fuse_modules", {"export_onnx": {"opset": 17}}, "onnxsim"])
    doc["model"]["path"] = "models"
    doc["data"]["calibration"]["tensors"] = "cal.npz"
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p in _paths(doc) if p] if isinstance(doc, (dict, list)) else []
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        current = doc
        for p in path:
            current = current[p]
        op = data.draw(st.sampled_from(["tweak", "tweak", "tweak", "replace", "delete", "add"]), label="op")
        value = data.draw(_tweak(current) if op == "tweak" else _values, label="value")
        doc = _mutate(doc, path, op, value, data.draw(st.text(max_size=8), label="key"))
    if data.draw(st.sampled_from(["yaml"] * 9 + ["text"]), label="document") == "text":
        text = data.draw(st.text(max_size=200), label="text")
    else:
        text = yaml.safe_dump(doc, allow_unicode=True)
    recipe = property_dir / "prop.yaml"
    recipe.write_text(text, encoding="utf-8")
    try:
        load_recipe(recipe, registry)
    except RecipeError:
        return
    raw = yaml.safe_load(text)
    assert _schema_valid(raw, registry), f"accepted a recipe that violates its schemas:\n{text}"
