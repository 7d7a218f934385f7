"""Bad input through the command line: a clear message naming the file or field, a non-zero
exit code, and no partial entry left in the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import write_tiny_recipe


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "accelc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def cache_state(cache: Path) -> tuple[list[str], list[str]]:
    """(committed entry names, leftover staging dirs)."""
    entries = sorted(p.name for p in (cache / "entries").iterdir()) if (cache / "entries").exists() else []
    staging = sorted(p.name for p in (cache / "tmp").iterdir()) if (cache / "tmp").exists() else []
    return entries, staging


def build(recipe: Path, tmp: Path) -> subprocess.CompletedProcess:
    return run(["build", str(recipe), "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "out")], tmp)


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    r = build(p, tmp_path)
    assert r.returncode == 2 and "bad.yaml" in r.stderr and "invalid YAML" in r.stderr
    assert cache_state(tmp_path / "cache") == ([], [])


def test_unknown_pass(tmp_path):
    r = build(write_tiny_recipe(tmp_path, passes=["export_onnx", "turbo"]), tmp_path)
    assert r.returncode == 2 and "passes[1]" in r.stderr and "unknown pass 'turbo'" in r.stderr
    assert cache_state(tmp_path / "cache") == ([], [])


def test_wrong_option_type(tmp_path):
    r = build(write_tiny_recipe(tmp_path, passes=[{"export_onnx": {"opset": "x"}}]), tmp_path)
    assert r.returncode == 2 and "passes[0].export_onnx.opset" in r.stderr
    assert cache_state(tmp_path / "cache") == ([], [])


def test_missing_model_weights_file(tmp_path):
    r = build(write_tiny_recipe(tmp_path, model={"weights": {"file": "nowhere.pth"}}), tmp_path)
    assert r.returncode == 2 and "model.weights.file" in r.stderr and "nowhere.pth" in r.stderr
    assert cache_state(tmp_path / "cache") == ([], [])


def test_checkpoint_that_is_not_tensors_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Evil()))
    r = build(write_tiny_recipe(tmp_path, model={"weights": {"file": "evil.pth"}}), tmp_path)
    assert r.returncode == 2 and "not a loadable tensor checkpoint" in r.stderr
    assert not (tmp_path / "pwned").exists()
    entries, staging = cache_state(tmp_path / "cache")
    assert staging == []
    assert not any(
        "load_model" in (tmp_path / "cache" / "entries" / e / "meta.json").read_text() for e in entries
    )


def test_missing_data_folder(tmp_path):
    r = build(
        write_tiny_recipe(tmp_path, data={"calibration": {"tensors": None, "images": "no_such_dir"}}),
        tmp_path,
    )
    assert r.returncode == 2 and "data.calibration.images" in r.stderr and "no_such_dir" in r.stderr
    assert cache_state(tmp_path / "cache") == ([], [])


def test_model_that_fails_to_export(tmp_path):
    r = build(
        write_tiny_recipe(
            tmp_path,
            model={"callable": "tiny_models:NotExportable"},
            verify={"enabled": False},
            benchmark={"enabled": False},
        ),
        tmp_path,
    )
    assert r.returncode == 4, r.stderr
    assert "export_onnx" in r.stderr and "torch.onnx.export failed" in r.stderr
    entries, staging = cache_state(tmp_path / "cache")
    assert staging == []  # the failed pass's staging dir is gone
    metas = [(tmp_path / "cache" / "entries" / e / "meta.json").read_text() for e in entries]
    assert not any('"pass": "export_onnx"' in m for m in metas)  # no entry for the failed pass
    assert any('"pass": "load_model"' in m for m in metas)  # completed passes stay cached


def test_callable_that_returns_no_module(tmp_path):
    r = build(write_tiny_recipe(tmp_path, model={"callable": "tiny_models:not_a_module"}), tmp_path)
    assert r.returncode == 2 and "not a torch.nn.Module" in r.stderr


@pytest.mark.parametrize("cmd", [["--help"], ["build", "--help"], ["plan", "--help"], ["cache", "--help"]])
def test_help_teaches(cmd, tmp_path):
    r = run(cmd, tmp_path)
    assert r.returncode == 0 and "Usage:" in r.stdout


def test_passes_name_describes_the_pass_and_every_option(tmp_path):
    r = run(["passes", "quantize"], tmp_path)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "quantize (plugin accelc.plugins.onnxruntime" in text and "produces onnx.qdq" in text
    assert "calibration: calibration.data (optional)" in text
    from accelc.registry import default_registry

    for option in default_registry().passes["quantize"].options_schema["properties"]:
        assert f"\n  {option}  " in r.stdout  # one entry per option the schema accepts
    assert "bias_correction boolean (default true)" in text and "Nagel et al. 2019" in text


def test_passes_with_an_unknown_name_lists_the_known_ones(tmp_path):
    r = run(["passes", "quantise"], tmp_path)
    assert r.returncode == 2 and "no pass 'quantise'" in r.stderr and "quantize" in r.stderr
