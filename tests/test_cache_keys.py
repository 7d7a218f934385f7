"""What changes a node's cache key, and what does not."""

from __future__ import annotations

import numpy as np
from builders import write_tiny_recipe

from accelc.build import prepare
from accelc.cache import Store
from accelc.executor import Executor
from accelc.host import Host


def keys(recipe, tmp_path) -> dict[str, str]:
    graph, reg = prepare(recipe)
    ex = Executor(graph, reg, Store(tmp_path / "store"), Host())
    return {n.id: ex.key(n.id) for n in graph.nodes}


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {k for k in a if a[k] != b.get(k)}


def test_unchanged_recipe_gives_identical_keys(tmp_path):
    p = write_tiny_recipe(tmp_path)
    assert keys(p, tmp_path) == keys(p, tmp_path)


#: Plain INT8 (the cpu default is accuracy-aware when the build verifies: its trials read the tolerances).
PLAIN = ["fuse_modules", "export_onnx", "onnxsim", "calibrate", "quantize"]


def test_quantize_option_reruns_quantize_and_downstream_only(tmp_path):
    base = keys(write_tiny_recipe(tmp_path, passes=PLAIN), tmp_path)
    steps = ["fuse_modules", "export_onnx", "onnxsim", "calibrate", {"quantize": {"per_channel": False}}]
    new = keys(write_tiny_recipe(tmp_path, "b.yaml", passes=steps), tmp_path)
    assert changed(base, new) == {"quantize", "verify[quantize]", "benchmark"}


def test_calibration_method_does_not_touch_export(tmp_path):
    base = keys(write_tiny_recipe(tmp_path), tmp_path)
    steps = ["fuse_modules", "export_onnx", "onnxsim", {"calibrate": {"method": "percentile"}}, "quantize"]
    new = keys(write_tiny_recipe(tmp_path, "b.yaml", passes=steps), tmp_path)
    assert changed(base, new) == {"calibrate", "quantize", "verify[quantize]", "benchmark"}


def test_tolerance_change_reruns_nothing(tmp_path):
    base = keys(write_tiny_recipe(tmp_path, passes=PLAIN), tmp_path)
    tol = {"tolerances": {"cosine": 0.5, "top1_agreement": 0.1}}
    new = keys(write_tiny_recipe(tmp_path, "b.yaml", passes=PLAIN, verify=tol), tmp_path)
    assert changed(base, new) == set()


def test_tolerance_change_reruns_the_accuracy_searches_of_the_default_pipeline(tmp_path):
    """calibrate's method trials and quantize's fallback aim at the quantize stage's tolerances."""
    base = keys(write_tiny_recipe(tmp_path), tmp_path)
    new = keys(write_tiny_recipe(tmp_path, "b.yaml", verify={"tolerances": {"cosine": 0.5}}), tmp_path)
    assert changed(base, new) == {"calibrate", "quantize", "verify[quantize]", "benchmark"}


def test_calibration_data_content_is_in_the_key(tmp_path):
    p = write_tiny_recipe(tmp_path)
    base = keys(p, tmp_path)
    arr = np.load(tmp_path / "cal.npz")["input"]
    arr[0, 0, 0, 0] += 1.0  # one value of one sample
    np.savez(tmp_path / "cal.npz", input=arr)
    new = keys(p, tmp_path)
    assert changed(base, new) == {
        "load_data[calibration]",
        "calibrate",
        "quantize",
        "verify[quantize]",
        "benchmark",
    }


def test_model_code_and_signature_are_in_the_key(tmp_path):
    base = keys(write_tiny_recipe(tmp_path), tmp_path)
    new = keys(write_tiny_recipe(tmp_path, "b.yaml", model={"kwargs": {"width": 4}}), tmp_path)
    assert "load_model" in changed(base, new) and "export_onnx" in changed(base, new)
    graph, reg = prepare(write_tiny_recipe(tmp_path))
    ex = Executor(graph, reg, Store(tmp_path / "store"), Host())
    material = ex._keys["load_model"][1]["material"]["identity"]
    assert len(material["code_sha256"]) == 64  # the model's source file, hashed
    assert "torch" in ex._keys["export_onnx"][1]["packages"]


def test_paths_are_not_in_the_key(tmp_path):
    """Moving the recipe and its data elsewhere keeps every key (content, not location, counts)."""
    a = keys(write_tiny_recipe(tmp_path / "a"), tmp_path)
    b = keys(write_tiny_recipe(tmp_path / "b"), tmp_path)
    assert a == b


def test_pass_source_code_is_in_the_key(tmp_path):
    """Editing a pass's module (without bumping its version) must not reuse old entries."""
    import accelc.passes.quantization as q
    from accelc.artifacts import sha256_file
    from accelc.executor import pass_code_closure, pass_code_digest

    graph, reg = prepare(write_tiny_recipe(tmp_path))
    ex = Executor(graph, reg, Store(tmp_path / "store"), Host())
    assert ex._keys["quantize"][1]["code"] == pass_code_digest(type(reg.passes["quantize"]))
    assert pass_code_closure(type(reg.passes["quantize"])).modules[q.__name__] == sha256_file(q.__file__)
    assert ex._keys["export_onnx"][1]["code"] != ex._keys["quantize"][1]["code"]
