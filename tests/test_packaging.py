"""Packaging: one source of truth for pins, one import namespace, schemas shipped as data."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile

import yaml
from builders import REPO


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_environment_yml_pins_equal_pyproject_pins():
    proj = _pyproject()["project"]
    declared = set(proj["dependencies"]) | set(proj["optional-dependencies"]["test"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pinned = {p for p in pip_section if not p.startswith("-")}
    assert pinned == declared
    assert all("==" in p for p in declared), "every dependency is pinned exactly"
    text = (REPO / "environment.yml").read_text()
    for pin in proj["optional-dependencies"]["gpu"]:  # the GPU section is commented out: CPU hosts skip it
        assert f"# - {pin}" in text


def test_wheel_holds_only_the_accelc_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("accelc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"accelc", "accelc-0.1.0.dist-info"}, tops
    assert "accelc/schemas/recipe.schema.json" in names
    assert "accelc/passes/quantization.py" in names and "accelc/plugins/hookspecs.py" in names
    entry_points = zipfile.ZipFile(wheel).read("accelc-0.1.0.dist-info/entry_points.txt").decode()
    assert "accelc = accelc.cli:main" in entry_points
