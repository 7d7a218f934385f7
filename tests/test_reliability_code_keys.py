"""Code-closure keys: a node's key covers the code that actually runs, so editing a module the
model or a pass imports never serves a stale artifact, and editing one it does not import
reruns nothing.

How each test was checked to fail without its mechanism (on the main branch before this change):
the ``python`` model source hashed only the callable's own module file, and ``pass_code_digest``
only the file defining the pass class (cached per class), with accelc's version in no key; so
editing ``helpers``/``sub``-package modules or a plugin's helper left every key unchanged.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from accelc.build import plan
from accelc.code_identity import code_closure


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))


def _append(p: Path, text: str) -> None:
    with open(p, "a") as f:
        f.write(text)


@pytest.fixture
def model_project(reliability_project, tmp_path):
    """A model module importing a sibling helper and a sub-package module (unique names per test)."""
    tag = tmp_path.name.replace("-", "_")
    root = tmp_path / "proj"
    mod, helper, pkg, other = f"m_{tag}", f"helpers_{tag}", f"pkg_{tag}", f"unrelated_{tag}"
    _write(root / f"{helper}.py", "WIDTH = 8\n")
    _write(root / pkg / "__init__.py", "")
    _write(root / pkg / "blocks.py", "def act(x):\n    return x\n")
    _write(root / f"{other}.py", "X = 1\n")
    _write(
        root / f"{mod}.py",
        f"""
        import torch
        from torch import nn
        from {helper} import WIDTH
        from {pkg}.blocks import act

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3 * 32 * 32, WIDTH)

            def forward(self, x):
                return act(self.fc(torch.flatten(x, 1)))
        """,
    )
    recipe = reliability_project.recipe_dict(
        "closure", model={"source": "python", "callable": f"{mod}:Net", "path": str(root)}, precision="fp32"
    )
    path = tmp_path / "closure.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, root, {"helper": root / f"{helper}.py", "sub": root / pkg / "blocks.py", "other": root / f"{other}.py"}


def _keys(recipe: Path, cache: Path) -> dict[str, str]:
    _, nodes = plan(recipe, cache_dir=cache)
    return {n.id: n.key for n in nodes}


def _model_dependent(keys: dict[str, str]) -> set[str]:
    return {n for n in keys if not n.startswith("load_data")}


@pytest.mark.parametrize("edited", ["helper", "sub"])
def test_editing_a_module_the_model_imports_changes_the_key_of_every_node_that_runs_it(model_project, tmp_path,
                                                                                         edited):
    recipe, _, files = model_project
    before = _keys(recipe, tmp_path / "cache")
    _append(files[edited], "\n# edited: same behaviour, other bytes\n")
    after = _keys(recipe, tmp_path / "cache")
    changed = {n for n in before if before[n] != after[n]}
    assert changed == _model_dependent(before)  # load_model and everything downstream of it
    assert "load_model" in changed


def test_editing_a_module_the_model_does_not_import_changes_no_key(model_project, tmp_path):
    recipe, _, files = model_project
    before = _keys(recipe, tmp_path / "cache")
    _append(files["other"], "\n# edited\n")
    assert _keys(recipe, tmp_path / "cache") == before


def test_the_model_key_names_its_modules_and_installed_distributions(model_project, tmp_path):
    from importlib.metadata import version

    recipe, root, files = model_project
    _, nodes = plan(recipe, cache_dir=tmp_path / "cache")
    identity = next(n for n in nodes if n.id == "load_model").material["material"]["identity"]
    stems = {Path(f).stem for f in files.values()}
    assert {m.split(".")[-1] for m in identity["modules"]} & stems == {files["helper"].stem, files["sub"].stem}
    assert identity["distributions"]["torch"] == version("torch")
    assert "torch" not in identity["modules"]  # installed: recorded by version, not hashed


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """A plugin package whose pass module imports a helper module of the same package."""
    name = f"plug_{tmp_path.name.replace('-', '_')}"
    root = tmp_path / "site"
    _write(root / name / "__init__.py", "")
    _write(root / name / "helper.py", "SCALE = 2\n")
    _write(root / name / "other.py", "UNUSED = 1\n")
    _write(
        root / name / "passes.py",
        f"""
        from accelc.pass_api import Pass

        class Scale(Pass):
            name = "scale_{name}"
            produces = "onnx"

            def run(self, ctx, inputs, options):
                from .helper import SCALE  # a lazy import runs too
                return SCALE
        """,
    )
    monkeypatch.syspath_prepend(str(root))
    cls = importlib.import_module(f"{name}.passes").Scale
    yield cls, root / name
    for m in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[m]


def test_editing_a_module_a_pass_imports_changes_its_code_digest(plugin_package):
    from accelc.executor import pass_code_digest

    cls, pkg = plugin_package
    before = pass_code_digest(cls)
    _append(pkg / "other.py", "\n# edited\n")
    assert pass_code_digest(cls) == before  # not imported by the pass: no change
    _append(pkg / "helper.py", "\n# edited\n")
    assert pass_code_digest(cls) != before


def test_accelc_modules_a_builtin_pass_imports_are_in_its_closure():
    from accelc.executor import pass_code_closure
    from accelc.registry import default_registry

    reg = default_registry()
    quantize = pass_code_closure(type(reg.passes["quantize"])).modules
    assert {"accelc.passes.bias_correction", "accelc.passes.sensitivity", "accelc.runners"} <= set(quantize)
    load_data = pass_code_closure(type(reg.passes["load_data"])).modules
    assert "accelc.runners" not in load_data and "accelc.passes.quantization" not in load_data


def test_accelc_version_is_in_every_pass_key(plugin_package, monkeypatch):
    import accelc.executor as executor

    cls, _ = plugin_package
    before = executor.pass_code_digest(cls)
    real = executor.package_version
    monkeypatch.setattr(executor, "package_version", lambda d: "99.0" if d == "accelc" else real(d))
    assert executor.pass_code_digest(cls) != before


def test_closure_resolves_without_running_the_code(tmp_path, monkeypatch):
    """Finding the closure imports nothing: a module that would raise on import is only read."""
    _write(tmp_path / "boom_i14" / "__init__.py", "raise RuntimeError('imported!')\n")
    _write(tmp_path / "boom_i14" / "inner.py", "X = 1\n")
    _write(tmp_path / "root_i14.py", "import boom_i14.inner\n")
    closure = code_closure("root_i14", search=[str(tmp_path)])
    assert {"root_i14", "boom_i14", "boom_i14.inner"} <= set(closure.modules)
    assert "boom_i14" not in sys.modules


def test_a_process_never_builds_from_a_stale_import_of_edited_code(model_project):
    """In one process (a notebook, a service calling ``build``), Python keeps running the copy of a
    module it imported first; after an edit the key describes the new code, so building from the old
    copy would cache a wrong artifact under the new key. The load is refused instead."""
    from accelc.errors import ModelSourceError
    from accelc.sources.models import PythonSource

    recipe, root, files = model_project
    options = yaml.safe_load(recipe.read_text())["model"]
    src = PythonSource()
    first = src.identity(options)
    assert src.load(options).fc.out_features == 8
    _write(files["helper"], "WIDTH = 4\n")
    assert src.identity(options)["code_sha256"] != first["code_sha256"]
    with pytest.raises(ModelSourceError, match="changed on disk after this process imported it"):
        src.load(options)


def test_import_lists_are_cached_by_digest_so_a_warm_process_parses_nothing(plugin_package, tmp_path, monkeypatch):
    import accelc.code_identity as ci

    cls, pkg = plugin_package
    cache_file = tmp_path / "code-imports.json"
    monkeypatch.setattr(ci, "_IMPORTS", {})
    monkeypatch.setattr(ci, "_DISK", {"path": None, "dirty": False})
    ci.use_import_cache(cache_file)
    cold = ci.code_closure(cls.__module__, follow={"accelc", cls.__module__.split(".")[0]})
    ci.flush_import_cache()
    assert cache_file.is_file()
    monkeypatch.setattr(ci, "_IMPORTS", {})  # a new process: nothing in memory
    monkeypatch.setattr(ci, "_DISK", {"path": None, "dirty": False})
    ci.use_import_cache(cache_file)

    def no_parse(*a, **kw):
        raise AssertionError("parsed a file whose import list is cached")

    monkeypatch.setattr(ci.ast, "parse", no_parse)
    assert ci.code_closure(cls.__module__, follow={"accelc", cls.__module__.split(".")[0]}) == cold
    _append(pkg / "helper.py", "\n# edited\n")  # a changed file has a new digest: parsed again
    with pytest.raises(AssertionError, match="parsed a file"):
        ci.code_closure(cls.__module__, follow={"accelc", cls.__module__.split(".")[0]})


def test_the_distribution_index_is_read_once_per_environment_not_once_per_process(tmp_path, monkeypatch):
    import importlib.metadata

    import accelc.code_identity as ci

    calls = []
    real = importlib.metadata.packages_distributions

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(ci.importlib.metadata, "packages_distributions", counting)
    monkeypatch.setattr(ci, "_DISK", {"path": tmp_path / "code-imports.json", "dirty": False})
    ci._all_distributions.cache_clear()
    first = ci._all_distributions()
    assert len(calls) == 1 and (tmp_path / "code-distributions.json").is_file()
    assert "yaml" in first and "PyYAML" in first["yaml"]  # a package named unlike its distribution
    ci._all_distributions.cache_clear()  # a new process, same environment: read from disk
    assert ci._all_distributions() == first and len(calls) == 1
    monkeypatch.setattr(ci, "_installed_fingerprint", lambda: "another environment")
    ci._all_distributions.cache_clear()  # a package was installed: the index is rebuilt
    assert ci._all_distributions() == first and len(calls) == 2
    ci._all_distributions.cache_clear()
