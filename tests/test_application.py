"""From artifact to application: ``accelc.runtime.load`` on every CPU artifact kind, the image
preprocessing it carries, ``accelc predict``, ``accelc init``, the help text at 80 columns,
validation that teaches, ``accelc env``'s pin roles and the counted progress events."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
sys.path.insert(0, str(Path(__file__).parent))

from builders import FIXTURES, write_tiny_recipe  # noqa: E402
from tiny_models import TinyConvNet  # noqa: E402

import accelc.runtime  # noqa: E402
from accelc.build import build, prepare  # noqa: E402
from accelc.errors import RecipeError, RuntimeLoadError  # noqa: E402


def cli(args: list[str], cwd: Path | None = None, columns: int = 200) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, "-m", "accelc.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def photos(folder: Path, n: int = 3) -> list[Path]:
    """Real photographs from scikit-image's data module, written as PNG files."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket")[:n]:
        p = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# -- accelc.runtime.load --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("ort")
    outcome = build(write_tiny_recipe(tmp), out_dir=tmp / "out", cache_dir=cache)
    assert outcome.ok, outcome.result.failure
    return tmp, outcome


def test_load_runs_the_onnxruntime_artifact_with_the_recipes_input_names(int8_build):
    tmp, outcome = int8_build
    deploy = json.loads((outcome.out_dir / "deploy.json").read_text())
    assert deploy["kind"] == "onnx.qdq" and deploy["artifact"] == "model.onnx" and deploy["runtime"] == "onnxruntime"
    assert deploy["inputs"][0]["name"] == "input" and deploy["preprocess"] is None
    assert deploy["recipe"]["model"]["callable"] == "tiny_models:TinyConvNet"
    assert [s["pass"] for s in deploy["recipe"]["pipeline"]][-1] == "benchmark"

    pred = accelc.runtime.load(outcome.out_dir)
    assert pred.input_names == ["input"] and type(pred.runner).__name__ == "OrtRunner"
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (y,) = pred(x)
    (by_name,) = pred(input=torch.from_numpy(x))  # by name, a torch tensor
    np.testing.assert_array_equal(y, by_name)
    torch.manual_seed(0)
    ref = TinyConvNet().eval()(torch.from_numpy(x)).detach().numpy()
    cos = (y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
    assert y.shape == (3, 10) and cos.min() > 0.9  # the INT8 model of the recipe's source model
    with pytest.raises(TypeError, match="expected inputs"):
        pred(image=x)
    with pytest.raises(RuntimeLoadError, match="no images dataset"):
        pred.preprocess(["x.png"])


def test_load_refuses_an_out_dir_without_deploy_json(tmp_path):
    with pytest.raises(RuntimeLoadError, match="deploy.json"):
        accelc.runtime.load(tmp_path)


def test_a_failed_build_leaves_no_deploy_json(int8_build, cache):
    tmp, _ = int8_build
    good = build(tmp / "recipe.yaml", out_dir=tmp / "again", cache_dir=cache)  # from the cache
    assert good.ok and (tmp / "again" / "deploy.json").is_file()
    bad = build(
        write_tiny_recipe(
            tmp, "strict.yaml", passes=["fuse_modules", "export_onnx", "onnxsim", "calibrate", "quantize"],
            verify={"tolerances": {"cosine": 0.999999999}},
        ),
        out_dir=tmp / "again",
        cache_dir=cache,
    )
    assert not bad.ok and not (tmp / "again" / "deploy.json").exists()
    assert not (tmp / "again" / "model.onnx").exists()


@pytest.mark.parametrize(
    ("runtime", "passes", "runner"),
    [
        ("openvino", None, "OpenVinoRunner"),
        (None, ["fuse_modules", "export"], "TorchRunner"),
    ],
    ids=["openvino.ir", "torch.exported"],
)
def test_load_runs_openvino_and_torch_artifacts(tmp_path, cache, runtime, passes, runner):
    over = {"precision": "fp32", "benchmark": {"enabled": False}}
    if runtime:
        over["runtime"] = runtime
    if passes:
        over["passes"] = passes
    outcome = build(write_tiny_recipe(tmp_path, **over), out_dir=tmp_path / "out", cache_dir=cache)
    assert outcome.ok, outcome.result.failure
    pred = accelc.runtime.load(outcome.out_dir)
    assert type(pred.runner).__name__ == runner
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    torch.manual_seed(0)
    ref = TinyConvNet().eval()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(pred(x)[0], ref, rtol=1e-3, atol=1e-4)


def test_every_runnable_kind_has_a_predictor():
    """Each runnable kind the built-in plugins register (ORT, OpenVINO, torch, TensorRT, CUDA graphs,
    Torch-TensorRT, ORT GPU sessions) is opened through a runtime's predictor or a registered runner."""
    from accelc.registry import default_registry

    reg = default_registry()
    runnable = {k for k, v in reg.kinds.items() if v.runnable}
    assert {"onnx", "onnx.qdq", "openvino.ir", "torch.exported", "trt.engine", "runtime.config"} <= runnable
    by_runtime = {k for rt in reg.runtimes.values() if rt.predictor is not None for k in rt.kinds}
    assert runnable <= by_runtime | set(reg.runners)
    assert {"trt.engine", "runtime.config", "onnx.qdq", "openvino.ir"} <= by_runtime


# -- images: preprocessing carried to the application, accelc predict ------------------------------


@pytest.fixture(scope="module")
def image_build(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("images")
    files = photos(tmp / "photos")
    pre = {"resize": 36, "crop": 32}
    recipe = write_tiny_recipe(
        tmp,
        precision="fp32",
        model={"kwargs": {"classes": 1000}},
        data={"calibration": {"tensors": None, "images": "photos", "preprocess": dict(pre)},
              "validation": {"tensors": None, "images": "photos", "preprocess": dict(pre)}},
        benchmark={"enabled": False},
    )
    outcome = build(recipe, out_dir=tmp / "out", cache_dir=cache)
    assert outcome.ok, outcome.result.failure
    return tmp, files, outcome


def test_preprocess_is_the_images_source_transform(image_build):
    from accelc.registry import default_registry
    from accelc.signature import InputSignature

    tmp, files, outcome = image_build
    pred = accelc.runtime.load(outcome.out_dir)
    assert pred.preprocessing["crop"] == 32 and pred.preprocessing["input"] == "input"
    x = pred.preprocess(files)
    spec = json.loads((outcome.out_dir / "deploy.json").read_text())["recipe"]["data"]["validation"]
    built = default_registry().data_sources["images"].load(spec, InputSignature.from_json(pred.deploy["inputs"]))
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x, built["input"])  # the very arrays the build verified on
    assert pred.class_names is not None and len(pred.class_names) == 1000
    top = pred.top_k(pred(x)[0], k=3)
    assert len(top) == 3 and all(name == pred.class_names[i] for i, name, _ in top[0])
    assert abs(sum(p for *_, p in pred.top_k(pred(x)[0], k=1000)[0]) - 1) < 1e-6


def test_predict_prints_top_k_with_imagenet_names(image_build):
    tmp, files, outcome = image_build
    r = cli(["predict", str(outcome.out_dir), str(files[0]), "-k", "2", "--json"])
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)
    from torchvision.models import ResNet18_Weights

    names = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(res["top_k"]) == 2 and res["top_k"][0]["label"] == names[res["top_k"][0]["index"]]
    text = cli(["predict", str(outcome.out_dir), str(files[1])]).stdout
    assert files[1].name in text and res["top_k"][0]["label"] not in ("", None)


def test_predict_prints_output_shapes_for_tensor_inputs(int8_build, tmp_path):
    _, outcome = int8_build
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 32, 32), np.float32))
    r = cli(["predict", str(outcome.out_dir), str(tmp_path / "x.npy")])
    assert r.returncode == 0, r.stderr
    assert "output 0: shape [2, 10] float32" in r.stdout


# -- validate: every planted mistake in one round -----------------------------------------------------


def test_validate_reports_every_planted_mistake_at_once_with_full_paths(tmp_path):
    (tmp_path / "cal").mkdir()
    (tmp_path / "my_model.py").write_text("import torch\n\ndef build():\n    return torch.nn.Identity()\n")
    doc = {
        "name": "planted",
        "model": {"source": "torchvision", "name": "mobilenet_v3_smal"},
        "inputs": [{"name": "input", "shape": [1, 3, 224, 224]}],
        "target": "cpu",
        "precision": "int8",
        "data": {
            "calibration": {"images": "cal"},  # exists but holds no images
            "validation": {"images": "missing_folder", "file": "x.csv"},
        },
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = cli(["validate", str(p)])
    assert r.returncode == 2
    err = r.stderr
    assert "data.validation.file: unknown key 'file'" in err and "allowed here:" in err and "images" in err
    doc["data"]["validation"].pop("file")
    p.write_text(yaml.safe_dump(doc))
    err = cli(["validate", str(p)]).stderr
    assert "model.name: torchvision has no model 'mobilenet_v3_smal'; did you mean 'mobilenet_v3_small'" in err
    assert "data.calibration.images: folder" in err and "holds no images" in err
    assert re.search(r"data\.validation\.images: folder \S+missing_folder does not exist", err)
    # a module next to the recipe without model.path, a callable it does not define, a typo in a target
    doc["model"] = {"source": "python", "callable": "my_model:bulid"}
    doc["target"] = "cpuu"
    p.write_text(yaml.safe_dump(doc))
    err = cli(["validate", str(p)]).stderr
    assert "model.callable: module 'my_model' not found" in err and "model.path" in err
    assert "target: unknown target 'cpuu'; did you mean 'cpu'" in err
    doc["model"]["path"] = "."
    doc["target"] = "cpu"
    p.write_text(yaml.safe_dump(doc))
    err = cli(["validate", str(p)]).stderr
    assert "model.callable: " in err and "defines no 'bulid'; did you mean 'build'" in err


def test_validate_runs_no_user_code(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    (pkg / "net.py").write_text("def build():\n    pass\n")
    with pytest.raises(RecipeError):  # tensors file missing: validation stops there, nothing imported
        prepare(write_tiny_recipe(tmp_path, model={"callable": "pkg.net:build", "path": "."},
                                  data={"calibration": {"tensors": "nope.npz"}}))
    assert not (tmp_path / "ran").exists()


# -- help for the terminal ----------------------------------------------------------------------------

_MARKUP = re.compile(r":(func|class|mod|meth|data|attr):`|``")


@pytest.mark.parametrize("args", [["passes"], ["passes", "quantize"], ["passes", "load_data"], ["sources"], ["targets"],
                                  ["sources", "images"], ["sources", "python"]])
def test_help_is_terminal_text_that_fits_80_columns(args):
    r = cli(args, columns=80)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line.rstrip()) <= 80 for line in lines), max(lines, key=len)
    assert not _MARKUP.search(r.stdout)
    if args == ["sources", "images"]:
        assert "preprocess.resize" in r.stdout and "Shorter side" in r.stdout
    if args == ["sources", "python"]:
        assert "path: ." in r.stdout  # a model file next to the recipe
    if args == ["passes", "load_data"]:
        assert re.search(r"role .*\n\s+Which dataset", r.stdout)


def test_passes_points_a_source_name_to_accelc_sources():
    r = cli(["passes", "images"])
    assert r.returncode == 2 and "accelc sources images" in r.stderr


# -- init, env, progress ------------------------------------------------------------------------------


def test_init_writes_a_recipe_that_validates(tmp_path):
    (tmp_path / "tiny_models.py").write_text((FIXTURES / "tiny_models.py").read_text())
    np.savez(tmp_path / "cal.npz", input=np.zeros((4, 3, 32, 32), np.float32))
    r = cli(["init", "--model", "python:tiny_models:TinyConvNet", "--input-shape", "1,3,32,32",
             "--data", "cal.npz", "--target", "cpu"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    v = cli(["validate", "recipe.yaml"], cwd=tmp_path)
    assert v.returncode == 0, v.stderr
    doc = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert doc["model"]["path"] == "." and doc["inputs"][0]["dynamic"][0]["max"] == 32
    again = cli(["init", "--model", "torchvision:resnet18", "--data", "photos"], cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    bad = cli(["init", "--model", "torchvision:resnet1", "--data", "photos", "-o", "r2.yaml"], cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean 'resnet18'" in bad.stderr and not (tmp_path / "r2.yaml").exists()


def test_env_separates_runtime_pins_from_test_pins(tmp_path):
    from importlib.metadata import version

    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "accelc"\ndependencies = ["numpy==1"]\n'
        '[project.optional-dependencies]\ntest = ["pytest==1"]\n'
    )
    env = tmp_path / "environment.yml"
    env.write_text(
        "name: x\ndependencies:\n  - pip:\n"
        f"      - numpy=={version('numpy')}\n      - pytest==0.0.1\n"
    )
    r = cli(["env", "--file", str(env), "--strict"])
    assert r.returncode == 0, r.stderr  # a test-only pin does not make the environment drift
    doc = json.loads(r.stdout)["environment_file"]
    assert doc["drift"] == [] and [d["name"] for d in doc["drift_not_runtime"]] == ["pytest"]
    assert "test/tool-only pins (test) differ" in r.stderr and "no drift" in r.stderr
    env.write_text(env.read_text().replace(f"numpy=={version('numpy')}", "numpy==0.0.1"))
    r = cli(["env", "--file", str(env), "--strict"])
    assert r.returncode == 1 and "numpy: pinned 0.0.1" in r.stderr


def test_long_passes_report_counted_progress(tmp_path, cache):
    """calibrate's trials and batches and the benchmark's timed runs arrive as (done, total) counts,
    which the CLI's reporter draws as progress bars."""
    from rich.console import Console

    from accelc.cli import RichReporter

    class Recording(RichReporter):
        def __init__(self) -> None:
            super().__init__(Console(file=open(os.devnull, "w"), force_terminal=True, width=80))  # noqa: SIM115
            self.counts: list[tuple[str, str, int, int]] = []

        def stage_count(self, node_id: str, message: str, done: int, total: int) -> None:
            super().stage_count(node_id, message, done, total)
            task = self.progress.tasks[-1] if message not in self.tasks else self.progress._tasks[self.tasks[message]]
            assert task.total == total and task.completed == done
            self.counts.append((node_id, message, done, total))

    rep = Recording()
    # a tolerance full INT8 misses, so quantize ranks its nodes by sensitivity before falling back
    recipe = write_tiny_recipe(tmp_path, seed=3, verify={"tolerances": {"cosine": 0.999999}})
    build(recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "c", reporter=rep)
    nodes = {(n, m.split(":")[0].split(" (")[0]) for n, m, _, _ in rep.counts}
    assert ("calibrate", "calibration trials") in nodes and ("calibrate", "calibrating") in nodes
    assert ("quantize", "sensitivity") in nodes and ("benchmark", "batch 1") in nodes
    batches = [(d, t) for n, m, d, t in rep.counts if n == "calibrate" and m.startswith("calibrating (ranges)")]
    assert batches[-1] == (16, 16)  # 16 calibration samples, batch 1 (one streamed pass for every method)
    trials = [(d, t) for n, m, d, t in rep.counts if m.startswith("calibration trials")]
    assert trials[0] == (0, 3) and trials[-1] == (3, 3)  # minmax, entropy, percentile
    units = [(d, t) for n, m, d, t in rep.counts if m.startswith("sensitivity")]
    assert units[-1][0] == units[-1][1] > 1


def test_plan_names_lowered_options_as_the_recipe_writes_them(int8_build, cache):
    """calibrate's trials score against the quantize stage's tolerances (its ``selection`` option, set by
    lowering): a changed verify tolerance is explained as that recipe field, not as ``selection``."""
    from accelc.build import plan

    tmp, outcome = int8_build
    _, nodes = plan(write_tiny_recipe(tmp, "tol.yaml", verify={"tolerances": {"cosine": 0.8}}),
                    cache_dir=cache, out_dir=outcome.out_dir)
    why = {n.id: n.reason for n in nodes if n.status == "run"}
    assert "verify.tolerances.cosine" in why["calibrate"] and "selection" not in why["calibrate"]
    assert "verify.tolerances.cosine" in why["quantize"]


def test_cache_list_shows_bracketed_node_ids_whole_at_80_columns(tmp_path):
    from click.testing import CliRunner

    from accelc.cache import Store
    from accelc.cli import main

    store = Store(tmp_path / "cache")
    for i, (node, kind) in enumerate([("verify[quantize]", "verification.report"),
                                      ("load_data[calibration]", "calibration.data")]):
        key = f"{i:064x}"
        staging = store.staging(key)
        (staging / "metrics.json").write_text("{}")
        store.commit(key, staging, kind, "metrics.json", {"node": node})
    r = CliRunner().invoke(main, ["cache", "list", "--cache-dir", str(tmp_path / "cache")], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    # not eaten as rich markup, not cut
    assert any("verify[quantize]" in ln and "verification.report" in ln for ln in lines), r.output
    assert any("load_data[calibration]" in ln and "calibration.data" in ln for ln in lines), r.output
    assert max(len(ln.rstrip()) for ln in lines) <= 80


@pytest.mark.parametrize("columns", [80, 120])
def test_plan_shows_every_node_name_whole_and_fits_the_terminal(tmp_path, columns):
    from click.testing import CliRunner

    from accelc.cli import main

    recipe = write_tiny_recipe(tmp_path)
    r = CliRunner().invoke(main, ["plan", str(recipe), "--cache-dir", str(tmp_path / "cache")],
                           env={"COLUMNS": str(columns)})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(ln.rstrip()) for ln in lines) <= columns
    for node in ("load_data[calibration]", "verify[quantize]", "export_onnx"):
        assert any(node in ln for ln in lines), (node, r.output)
    assert ("┃ inputs" in r.output) == (columns >= 100)  # the column, not the hint below the table
