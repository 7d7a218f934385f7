"""The GPU runtimes beyond engines and torch: Torch-TensorRT (``torch_tensorrt``) and ONNX Runtime's GPU
providers (``ort_gpu_session``, :func:`select_providers`).

Everything here runs on a CPU host: option schemas, compile settings, provider selection, cache-key
material and plans (hosts described by overrides). The GPU tests at the end are marked ``cuda`` and
skipped without a CUDA device or the package they need, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from builders import REPO
from jsonschema import Draft202012Validator

from accelc.artifacts import Artifact
from accelc.build import prepare
from accelc.cache import Store
from accelc.errors import PassError
from accelc.executor import Executor
from accelc.host import Host
from accelc.pass_api import PassContext
from accelc.passes import ort_providers, torch_trt
from accelc.passes.onnxruntime import ort_session
from accelc.passes.ort_providers import (
    CPU_EP,
    CUDA_EP,
    ONNXRUNTIME_GPU,
    TRT_EP,
    OrtSessionRunner,
    ProviderError,
    ProviderRequest,
    engine_cache_dir,
    provider_names,
    request_from_config,
    select_providers,
)
from accelc.passes.torch_trt import TorchTensorRT, TorchTensorRTRunner, compile_settings, input_profiles
from accelc.recipe import apply_defaults, schema_issues
from accelc.registry import default_registry
from accelc.runners import RunnerFactory
from accelc.signature import InputSignature

HAS_CUDA = torch.cuda.is_available()
T4_HOST = {"cuda": {"name": "Tesla T4", "sm": 75, "count": 1}, "tensorrt": "11.1.0.106"}
NO_GPU = {"cuda": None, "tensorrt": None}
#: Parameter names of torch_tensorrt.dynamo.compile in torch-tensorrt 2.14.0 that the pass uses
#: (read from the wheel), and the TensorRT-10-era switch older releases still had.
TTRT_214_PARAMS = {
    "workspace_size", "optimization_level", "min_block_size", "require_full_compilation", "use_fp32_acc",
    "hardware_compatible", "cache_built_engines", "reuse_cached_engines", "enable_autocast",
    "autocast_low_precision_type",
}


def _opts(p, **over):
    return apply_defaults(p.options_schema, over)


def _gpu_recipe(tmp: Path, runtime: str, precision: str = "fp16", source: str = "resnet18_cuda_fp16.yaml") -> Path:
    doc = yaml.safe_load((REPO / "recipes" / source).read_text())
    doc.update(runtime=runtime, precision=precision)
    doc["data"]["validation"]["images"] = str(REPO / "recipes" / doc["data"]["validation"]["images"])
    if "calibration" in doc["data"]:
        doc["data"]["calibration"]["images"] = str(REPO / "recipes" / doc["data"]["calibration"]["images"])
    path = tmp / f"{runtime}_{precision}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _sig(dynamic: bool = True) -> InputSignature:
    dyn = [{"axis": 0, "name": "batch", "min": 1, "opt": 4, "max": 16}] if dynamic else []
    return InputSignature.from_json([{"name": "input", "shape": [1, 3, 16, 16], "dynamic": dyn}])


# -- torch_tensorrt ------------------------------------------------------------------------------------


def test_torch_tensorrt_pass_declares_cuda_tensorrt_and_a_valid_schema():
    p = default_registry().passes["torch_tensorrt"]
    assert isinstance(p, TorchTensorRT)
    assert set(p.requires) >= {"cuda", "tensorrt"}
    assert p.inputs[0].kinds == ("torch.exported", "torch.module")
    Draft202012Validator.check_schema(p.options_schema)
    defaults = _opts(p)
    assert defaults["autocast"] == "none" and defaults["workspace_mib"] == 1024
    for bad in ({"autocast": "int8"}, {"optimization_level": 6}, {"enabled_precisions": ["fp16"]},
                {"workspace_mib": 1}):
        assert schema_issues(p.options_schema, bad), bad
    assert default_registry().runners["torch_tensorrt.exported"] is TorchTensorRTRunner


def test_compile_settings_use_autocast_not_enabled_precisions():
    p = TorchTensorRT()
    kw = compile_settings(_opts(p, workspace_mib=64, optimization_level=5), TTRT_214_PARAMS)
    assert kw["workspace_size"] == 64 << 20 and kw["optimization_level"] == 5
    assert "enabled_precisions" not in kw and "enable_autocast" not in kw
    assert "use_explicit_typing" not in kw  # 2.14 has no such switch: every network is strongly typed
    assert kw["cache_built_engines"] is False and kw["reuse_cached_engines"] is False
    half = compile_settings(_opts(p, autocast="float16"), TTRT_214_PARAMS)
    assert half["enable_autocast"] is True and half["autocast_low_precision_type"] is torch.float16
    bf = compile_settings(_opts(p, autocast="bfloat16"), TTRT_214_PARAMS)
    assert bf["autocast_low_precision_type"] is torch.bfloat16
    older = compile_settings(_opts(p), TTRT_214_PARAMS | {"use_explicit_typing"})
    assert older["use_explicit_typing"] is True
    with pytest.raises(PassError, match="enable_autocast"):
        compile_settings(_opts(p, autocast="float16"), TTRT_214_PARAMS - {"enable_autocast"})
    # a switch left off does not need the keyword (off is the library default); one turned on does
    assert "use_fp32_acc" not in compile_settings(_opts(p), TTRT_214_PARAMS - {"use_fp32_acc"})
    with pytest.raises(PassError, match="use_fp32_acc"):
        compile_settings(_opts(p, use_fp32_acc=True), TTRT_214_PARAMS - {"use_fp32_acc"})
    with pytest.raises(PassError, match="workspace_size"):
        compile_settings(_opts(p), TTRT_214_PARAMS - {"workspace_size"})


def test_input_profiles_come_from_the_dynamic_axes_and_the_model_dtype():
    (prof,) = input_profiles(_sig(), "float16")
    assert prof == {"min_shape": (1, 3, 16, 16), "opt_shape": (4, 3, 16, 16), "max_shape": (16, 3, 16, 16),
                    "dtype": "float16"}
    two = InputSignature.from_json([
        {"name": "ids", "shape": [2, 8], "dtype": "int64",
         "dynamic": [{"axis": 0, "name": "batch", "min": 1, "opt": 2, "max": 4}]},
        {"name": "mask", "shape": [2, 8], "dtype": "int64",
         "dynamic": [{"axis": 0, "name": "batch", "min": 1, "opt": 2, "max": 4}]},
    ])
    ids, mask = input_profiles(two, "float16")
    assert ids["dtype"] == "int64" and ids["shared_dims"] == {0: "batch"} == mask["shared_dims"]
    (static,) = input_profiles(_sig(dynamic=False), "float32")
    assert static["min_shape"] == static["max_shape"] == (1, 3, 16, 16) and "shared_dims" not in static


def test_torch_tensorrt_runtime_plans_on_a_cpu_host_and_stops_at_the_compile(tmp_path):
    graph, reg = prepare(_gpu_recipe(tmp_path, "torch_tensorrt"))
    ids = [n.id for n in graph.nodes]
    assert ids[ids.index("fuse_modules"):] == [
        "fuse_modules", "to_half", "verify[to_half]", "export", "verify[export]", "torch_tensorrt",
        "verify[torch_tensorrt]", "benchmark",
    ]
    assert graph.final == "torch_tensorrt"
    assert graph.by_id["torch_tensorrt"].inputs == {"model": "export"}
    assert graph.by_id["verify[torch_tensorrt]"].options["device"] == "cuda"
    plan = {p.id: p for p in Executor(graph, reg, Store(tmp_path / "c"), Host(overrides=NO_GPU)).plan()}
    for node in ("load_model", "fuse_modules", "to_half", "export"):
        assert plan[node].status == "run", node
    assert {c for c, _ in plan["torch_tensorrt"].missing} == {"cuda", "tensorrt"}
    assert {c for c, _ in plan["verify[torch_tensorrt]"].missing} == {"cuda", "tensorrt"}
    on_t4 = Executor(graph, reg, Store(tmp_path / "c"), Host(overrides=T4_HOST)).plan()
    assert [p.id for p in on_t4 if p.status == "blocked"] == []


def test_torch_tensorrt_key_holds_gpu_sm_tensorrt_and_torch_tensorrt_versions(tmp_path, monkeypatch):
    graph, reg = prepare(_gpu_recipe(tmp_path, "torch_tensorrt"))

    def keys(host: dict, ttrt: str) -> dict[str, str]:
        monkeypatch.setattr(torch_trt, "torch_tensorrt_versions", lambda: {"torch_tensorrt": ttrt, "tensorrt": None})
        ex = Executor(graph, reg, Store(tmp_path / "c"), Host(overrides=host))
        return {n.id: ex.key(n.id) for n in graph.nodes}, ex

    base, ex = keys(T4_HOST, "2.14.0")
    assert ex._keys["torch_tensorrt"][1]["material"]["host"] == {
        "gpu": "Tesla T4", "sm": 75, "tensorrt": "11.1.0.106", "torch_tensorrt": "2.14.0"}
    variants = [
        keys(T4_HOST, "2.13.0")[0],
        keys({**T4_HOST, "tensorrt": "11.2.1.2"}, "2.14.0")[0],
        keys({**T4_HOST, "cuda": {"name": "NVIDIA A10G", "sm": 86, "count": 1}}, "2.14.0")[0],
    ]
    for other in variants:
        assert other["torch_tensorrt"] != base["torch_tensorrt"]
        assert other["export"] == base["export"] and other["to_half"] == base["to_half"]


@pytest.mark.skipif(HAS_CUDA, reason="checks the exit status on a host without CUDA")
def test_torch_tensorrt_build_on_a_cpu_host_exits_3_at_the_compile(tmp_path):
    import os
    import subprocess

    from builders import write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path, target="cuda", runtime="torch_tensorrt", precision="fp16", data=None,
                               benchmark={"batch_sizes": [1], "warmup": 1, "iterations": 2})
    env = {**os.environ, "ACCELC_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "accelc.cli", "build", str(recipe), "--out", "out"], cwd=tmp_path,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "torch_tensorrt" in r.stderr and "cuda" in r.stderr and "tensorrt" in r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["node"] for s in rep["stages"] if s["status"] == "ok"][-2:] == ["to_half", "export"]
    assert rep["stages"][-1]["node"] == "torch_tensorrt" and rep["stages"][-1]["status"] == "blocked"


def _torch_module_artifact(tmp: Path) -> Artifact:
    d = tmp / "in"
    d.mkdir()
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2)).eval(), d / "model.pt")
    return Artifact("torch.module", d, "model.pt", "x", {"input_names": ["input"]})


def test_torch_tensorrt_pass_and_runner_fail_clearly_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # makes `import torch_tensorrt` raise ImportError
    reg = default_registry()
    work = tmp_path / "w"
    work.mkdir()
    ctx = PassContext(work, _sig(), Host(overrides=T4_HOST), RunnerFactory(reg.runners, reg.runtimes), reg, node="t")
    art = _torch_module_artifact(tmp_path)
    with pytest.raises(PassError, match=r"torch_tensorrt cannot be imported.*pip install -e '\.\[gpu\]'"):
        TorchTensorRT().run(ctx, {"model": art}, _opts(TorchTensorRT()))
    assert list(work.iterdir()) == []
    with pytest.raises(PassError, match="torch_tensorrt cannot be imported"):
        TorchTensorRTRunner(Artifact("torch_tensorrt.exported", tmp_path, "model.ep", "x"))


# -- ONNX Runtime GPU providers ------------------------------------------------------------------------

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_BUILD = ["CPUExecutionProvider"]


def test_cpu_device_always_gets_the_cpu_provider():
    assert select_providers(GPU_BUILD, "cpu") == [CPU_EP]
    assert select_providers(CPU_BUILD, "cpu", strict=True) == [CPU_EP]


def test_cuda_uses_the_cuda_provider_and_tensorrt_only_where_installed():
    assert select_providers(GPU_BUILD, "cuda") == [(CUDA_EP, {"device_id": "0"}), CPU_EP]
    full = select_providers(GPU_BUILD, "cuda", ProviderRequest(device_id=1), tensorrt_installed=True)
    assert provider_names(full) == [TRT_EP, CUDA_EP, CPU_EP]
    assert full[0][1]["device_id"] == "1" and full[1][1] == {"device_id": "1"}
    off = select_providers(GPU_BUILD, "cuda", ProviderRequest(tensorrt="off"), tensorrt_installed=True)
    assert provider_names(off) == [CUDA_EP, CPU_EP]
    # a CUDA-only build (no TensorRT EP compiled in) with TensorRT installed: CUDA EP
    assert provider_names(select_providers([CUDA_EP, CPU_EP], "cuda", tensorrt_installed=True)) == [CUDA_EP, CPU_EP]


def test_tensorrt_provider_options_per_precision():
    prof = {"input": ((1, 3, 224, 224), (1, 3, 224, 224), (32, 3, 224, 224))}
    req = ProviderRequest(int8=True, engine_cache_dir="/c/t4", workspace_mib=512, profile=prof)
    (name, opts), *_ = select_providers(GPU_BUILD, "cuda", req, tensorrt_installed=True)
    assert name == TRT_EP
    assert opts["trt_int8_enable"] == "True" and opts["trt_fp16_enable"] == "False"
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == "/c/t4"
    assert opts["trt_timing_cache_path"] == "/c/t4"
    assert opts["trt_max_workspace_size"] == str(512 << 20)
    assert opts["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert opts["trt_profile_max_shapes"] == "input:32x3x224x224"
    (_, fp16), *_ = select_providers(GPU_BUILD, "cuda", ProviderRequest(fp16=True), tensorrt_installed=True)
    assert fp16["trt_fp16_enable"] == "True" and "trt_engine_cache_enable" not in fp16
    assert all(isinstance(v, str) for v in opts.values())


def test_missing_gpu_providers_fall_back_or_fail_naming_the_gpu_wheel():
    assert select_providers(CPU_BUILD, "cuda") == [CPU_EP]  # ort_session's lenient default
    with pytest.raises(ProviderError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu==1\.31\.1"):
        select_providers(CPU_BUILD, "cuda", strict=True)
    with pytest.raises(ProviderError, match="TensorRT is not installed"):
        select_providers(GPU_BUILD, "cuda", ProviderRequest(tensorrt="on"), tensorrt_installed=False)
    with pytest.raises(ProviderError, match="has no TensorrtExecutionProvider"):
        select_providers([CUDA_EP, CPU_EP], "cuda", ProviderRequest(tensorrt="on"), tensorrt_installed=True)
    with pytest.raises(ValueError):
        select_providers(GPU_BUILD, "rocm")


def test_engine_cache_folder_differs_per_gpu_and_version(tmp_path):
    a = engine_cache_dir(tmp_path, "Tesla T4", 75, "1.31.1", "11.1.0.106")
    assert a.parent == tmp_path and a.name == "tesla-t4-sm75-ort1.31.1-trt11.1.0.106"
    others = {engine_cache_dir(tmp_path, "NVIDIA H100 80GB HBM3", 90, "1.31.1", "11.1.0.106"),
              engine_cache_dir(tmp_path, "Tesla T4", 75, "1.31.0", "11.1.0.106"),
              engine_cache_dir(tmp_path, "Tesla T4", 75, "1.31.1", "10.16.1.11")}
    assert a not in others and len(others) == 3
    cfg = {"options": {"device_id": 0, "tensorrt": "on", "int8": True, "engine_cache": True},
           "profile": {"input": [[1, 3, 8, 8], [1, 3, 8, 8], [4, 3, 8, 8]]}}
    req = request_from_config(cfg, Host(overrides=T4_HOST), cache_root=tmp_path)
    assert req.int8 and req.tensorrt == "on" and req.profile == {"input": ((1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8))}
    assert Path(req.engine_cache_dir).parent == tmp_path and "tesla-t4-sm75" in req.engine_cache_dir


def test_ort_session_still_runs_on_the_cpu_build(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "relu",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    sess = ort_session(path, 1, "cuda")  # the CPU build: falls back to the CPU provider, as before
    assert sess.get_providers()[-1] == CPU_EP
    out = sess.run(None, {"input": np.array([-1.0, 2.0], np.float32)})[0]
    assert out.tolist() == [0.0, 2.0]


def test_gpu_onnxruntime_runtime_plans_and_runs_onnx_stages_before_the_gpu(tmp_path):
    graph, reg = prepare(_gpu_recipe(tmp_path, "onnxruntime", "int8", "resnet18_t4_int8.yaml"))
    ids = [n.id for n in graph.nodes]
    assert ids[ids.index("fuse_modules"):] == [
        "fuse_modules", "export_onnx", "onnxsim", "verify[onnxsim]", "calibrate", "quantize", "verify[quantize]",
        "ort_gpu_session", "verify[ort_gpu_session]", "benchmark",
    ]
    node = graph.by_id["ort_gpu_session"]
    assert node.inputs == {"model": "quantize"} and node.options["int8"] and node.options["tensorrt"] == "on"
    assert "sm==75" in node.requires
    assert graph.by_id["verify[quantize]"].options["device"] == "cpu"
    assert graph.by_id["verify[ort_gpu_session]"].options["device"] == "cuda"
    plan = {p.id: p for p in Executor(graph, reg, Store(tmp_path / "c"), Host(overrides=NO_GPU)).plan()}
    assert plan["quantize"].status == "run" and plan["ort_gpu_session"].status == "blocked"
    assert [c for c, _ in plan["ort_gpu_session"].missing] == ["cuda"]
    fp32, _ = prepare(_gpu_recipe(tmp_path, "onnxruntime", "fp32", "resnet18_t4_int8.yaml"))
    assert fp32.by_id["ort_gpu_session"].inputs == {"model": "onnxsim"} and fp32.final == "ort_gpu_session"


def test_ort_gpu_session_key_holds_the_onnxruntime_distribution_and_gpu(tmp_path, monkeypatch):
    graph, reg = prepare(_gpu_recipe(tmp_path, "onnxruntime", "fp32", "resnet18_t4_int8.yaml"))
    ex = Executor(graph, reg, Store(tmp_path / "c"), Host(overrides=T4_HOST))
    host = ex._keys["ort_gpu_session"][1]["material"]["host"]
    assert host["gpu"] == "Tesla T4" and host["sm"] == 75 and host["tensorrt"] == "11.1.0.106"
    assert host["onnxruntime"].startswith("onnxruntime ")  # the CPU wheel here
    before = ex.key("ort_gpu_session")
    monkeypatch.setattr(ort_providers, "installed_onnxruntime", lambda: ("onnxruntime-gpu", "1.31.1"))
    after = Executor(graph, reg, Store(tmp_path / "c"), Host(overrides=T4_HOST))
    assert after.key("ort_gpu_session") != before and after.key("onnxsim") == ex.key("onnxsim")


def test_session_runner_refuses_the_cpu_wheel_naming_the_gpu_one(tmp_path):
    import onnxruntime as ort

    if CUDA_EP in ort.get_available_providers():
        pytest.skip("checks the message with the CPU build of onnxruntime installed")
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "session.json").write_text(json.dumps({"format": 1, "model": "model.onnx", "options": {}}))
    with pytest.raises(ProviderError, match=r"pip install onnxruntime-gpu==1\.31\.1"):
        OrtSessionRunner(Artifact("ort.session", tmp_path, "session.json", "x"), host=Host(overrides=T4_HOST))
    (tmp_path / "session.json").write_text(json.dumps({"format": 1, "model": "gone.onnx"}))
    with pytest.raises(PassError, match="gone.onnx"):
        OrtSessionRunner(Artifact("ort.session", tmp_path, "session.json", "x"))


def test_onnxruntime_gpu_pin_is_the_cpu_release_and_documented():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    cpu = next(d for d in deps if d.startswith("onnxruntime=="))
    assert ONNXRUNTIME_GPU.split("==")[1] == cpu.split("==")[1]
    assert f"# - {ONNXRUNTIME_GPU}" in (REPO / "environment.yml").read_text()
    assert ONNXRUNTIME_GPU in (REPO / "docs" / "gpu.md").read_text()
    gpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert not any(d.startswith("onnxruntime") for d in gpu_extra)  # it would share an env with the CPU wheel


# -- on a GPU ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or importlib.util.find_spec("torch_tensorrt") is None,
                    reason="needs a CUDA GPU and the torch_tensorrt package")
def test_torch_tensorrt_compiles_saves_and_reloads_a_tiny_model(tmp_path):
    reg = default_registry()
    work = tmp_path / "w"
    work.mkdir()
    ctx = PassContext(work, _sig(), Host(), RunnerFactory(reg.runners, reg.runtimes), reg, node="t")
    art = _torch_module_artifact(tmp_path)
    r = TorchTensorRT().run(ctx, {"model": art}, _opts(TorchTensorRT(), min_block_size=1))
    assert r.main == "model.ep" and r.metrics["checked_batches"] == [4, 1]
    runner = TorchTensorRTRunner(Artifact("torch_tensorrt.exported", work, r.main, "x", r.meta))
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    (out,) = runner.run({"input": x})
    ref = torch.load(art.file, weights_only=False)(torch.from_numpy(x)).detach().numpy()
    assert out.shape == (3, 2) and np.abs(out - ref).max() < 1e-2


def _has_cuda_ep() -> bool:
    import onnxruntime as ort

    return CUDA_EP in ort.get_available_providers()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or not _has_cuda_ep(),
                    reason="needs a CUDA GPU and onnxruntime-gpu (the CPU onnxruntime build has no CUDA EP)")
def test_ort_gpu_session_runs_on_the_cuda_provider(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from accelc.passes.ort_providers import OrtGpuSession

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["output"])], "mm",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
                              [numpy_helper.from_array(w, "w")])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(src / "model.onnx"))
    reg = default_registry()
    work = tmp_path / "w"
    work.mkdir()
    sig = InputSignature.from_json([{"name": "input", "shape": [1, 4],
                                     "dynamic": [{"axis": 0, "name": "batch", "min": 1, "opt": 1, "max": 8}]}])
    ctx = PassContext(work, sig, Host(), RunnerFactory(reg.runners, reg.runtimes), reg, node="t")
    p = OrtGpuSession()
    r = p.run(ctx, {"model": Artifact("onnx", src, "model.onnx", "x", {})}, _opts(p, tensorrt="off"))
    assert r.metrics["providers"][0] == CUDA_EP
    runner = OrtSessionRunner(Artifact("ort.session", work, r.main, "x", r.meta))
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    (out,) = runner.run({"input": x})
    assert np.abs(out - x @ w).max() < 1e-3
