"""Recipe reading and validation: every problem reported at once, each with its JSON path."""

from __future__ import annotations

import pytest
import yaml
from builders import REPO, tiny_recipe_dict, write_tiny_recipe

from accelc.errors import RecipeError
from accelc.recipe import load_recipe
from accelc.registry import default_registry


def _load(path, **kw):
    return load_recipe(path, default_registry(), **kw)


def _write(tmp_path, doc) -> object:
    for name in ("cal.npz", "val.npz"):  # the data files the tiny recipe names (validate checks they exist)
        (tmp_path / name).touch()
    p = tmp_path / "r.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def test_valid_recipe_gets_defaults_and_absolute_paths(tmp_path):
    r = _load(write_tiny_recipe(tmp_path))
    assert r.precision == "int8" and r.target == "cpu"
    assert r.signature.inputs[0].dynamic[0].max == 8
    assert r.data["calibration"]["source"] == "tensors"
    assert r.data["calibration"]["tensors"] == str((tmp_path / "cal.npz").resolve())
    assert r.model["seed"] == 0  # default from the python source's options schema


def test_all_problems_reported_at_once_with_json_paths(tmp_path):
    doc = tiny_recipe_dict(
        colour="blue",  # unknown key
        inputs=[{"name": "input", "shape": [1, "three", 32, 32]}],
        passes=["fuse_modules", "export_onnx", "onnxsim", {"calibrate": {"method": "median"}}, "quantize"],
    )
    with pytest.raises(RecipeError) as e:
        _load(_write(tmp_path, doc))
    where = {i.where for i in e.value.issues}
    assert "colour" in where  # additionalProperties: the unknown key's own path
    assert "inputs[0].shape[1]" in where
    msg = str(e.value)
    assert "colour" in msg and "'three' is not of type 'integer'" in msg


def test_pass_option_errors_name_the_pass_path(tmp_path):
    doc = tiny_recipe_dict(
        passes=["fuse_modules", "export_onnx", "onnxsim", {"calibrate": {"method": "median"}}, "quantize"]
    )
    with pytest.raises(RecipeError) as e:
        _load(_write(tmp_path, doc))
    assert [i.where for i in e.value.issues] == ["passes[3].calibrate.method"]
    assert "median" in e.value.issues[0].message


def test_wrong_option_type_is_reported(tmp_path):
    doc = tiny_recipe_dict(passes=[{"export_onnx": {"opset": "eighteen"}}])
    with pytest.raises(RecipeError) as e:
        _load(_write(tmp_path, doc))
    assert e.value.issues[0].where == "passes[0].export_onnx.opset"


def test_unknown_pass_lists_known_passes(tmp_path):
    doc = tiny_recipe_dict(passes=["fuse_modules", "make_it_fast"])
    with pytest.raises(RecipeError) as e:
        _load(_write(tmp_path, doc))
    (issue,) = e.value.issues
    assert issue.where == "passes[1]" and "make_it_fast" in issue.message and "quantize" in issue.message


def test_unknown_target_and_model_source(tmp_path):
    doc = tiny_recipe_dict(target="tpu9", model={"source": "hub", "callable": None, "path": None})
    with pytest.raises(RecipeError) as e:
        _load(_write(tmp_path, doc))
    where = {i.where: i.message for i in e.value.issues}
    assert "unknown target 'tpu9'" in where["target"]
    assert "unknown model source 'hub'" in where["model.source"]


def test_model_source_options_checked(tmp_path):
    doc = tiny_recipe_dict(model={"kwargs": "width=3"})
    with pytest.raises(RecipeError) as e:
        _load(_write(tmp_path, doc))
    assert [i.where for i in e.value.issues] == ["model.kwargs"]


def test_dynamic_range_must_be_ordered(tmp_path):
    doc = tiny_recipe_dict(
        inputs=[
            {"name": "input", "shape": [1, 3, 32, 32], "dynamic": [{"axis": 0, "min": 4, "opt": 2, "max": 8}]}
        ]
    )
    with pytest.raises(RecipeError) as e:
        _load(_write(tmp_path, doc))
    assert e.value.issues[0].where == "inputs[0].dynamic[0]"


def test_malformed_yaml_names_line(tmp_path):
    with pytest.raises(RecipeError) as e:
        _load(_write(tmp_path, "name: x\nmodel: {source: python\ninputs: [\n"))
    assert "invalid YAML" in str(e.value) and "line" in str(e.value)


def test_yaml_tags_that_construct_objects_are_refused(tmp_path):
    with pytest.raises(RecipeError) as e:
        _load(_write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n"))
    assert "invalid YAML" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError) as e:
        _load(tmp_path / "nope.yaml")
    assert "file not found" in str(e.value)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    r = _load(recipe)
    assert r.name == recipe.stem
