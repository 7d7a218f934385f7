"""GPU targets: TensorRT engine, CUDA graphs, the PyTorch-native runtime and the GPU target profiles.

Everything that needs no GPU (option schemas, optimization profiles, cache-key fields, runner
selection, plans on a CPU host, the torch passes on tiny models, runtime.json) runs here on the
CPU. Tests that need CUDA or TensorRT are skipped elsewhere, with that reason.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import REPO
from jsonschema import Draft202012Validator
from torch import nn

from accelc.artifacts import Artifact
from accelc.build import prepare
from accelc.cache import Store
from accelc.errors import PassError, RuntimeLoadError
from accelc.executor import Executor
from accelc.graph import unmet
from accelc.host import Host
from accelc.pass_api import PassContext
from accelc.passes.cuda_graph import CudaGraph, graph_shapes
from accelc.passes.cuda_graph_runtime import (
    CONFIG_NAME,
    RuntimeConfig,
    RuntimeConfigRunner,
    plan_chunks,
    read_config,
    write_config,
)
from accelc.passes.tensorrt import (
    SUPPORTED_TENSORRT,
    TrtEngine,
    TrtEngineRunner,
    TrtTimingCache,
    fold_int32_dequantize,
    optimization_profile,
    version_ok,
)
from accelc.passes.torch_runtime import Export, Script, ToHalf, TorchRunner, Trace, example_batches
from accelc.recipe import apply_defaults, schema_issues
from accelc.registry import default_registry
from accelc.runners import RunnerFactory
from accelc.signature import InputSignature

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
# ``cuda`` marks every test that needs the GPU, so a GPU host runs exactly them with ``pytest -m cuda``.
def needs_cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


def needs_trt(test):
    skip = pytest.mark.skipif(not (HAS_CUDA and HAS_TRT), reason="needs a CUDA GPU and the tensorrt package")
    return pytest.mark.cuda(skip(test))

T4_HOST = {"cuda": {"name": "Tesla T4", "sm": 75, "count": 1}, "tensorrt": "10.13.3.9"}
A100_HOST = {"cuda": {"name": "NVIDIA A100-SXM4-40GB", "sm": 80, "count": 1}, "tensorrt": "10.13.3.9"}
NO_GPU = {"cuda": None, "tensorrt": None}
T4_RECIPE = REPO / "recipes" / "resnet18_t4_int8.yaml"
FP16_RECIPE = REPO / "recipes" / "resnet18_cuda_fp16.yaml"


def signature(batch: tuple[int, int, int] | None = (1, 1, 8), shape=(1, 3, 16, 16)) -> InputSignature:
    dyn = [] if batch is None else [{"axis": 0, "name": "batch", "min": batch[0], "opt": batch[1], "max": batch[2]}]
    return InputSignature.from_json([{"name": "input", "shape": list(shape), "dynamic": dyn}])


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def module_artifact(tmp: Path, model: nn.Module, **meta) -> Artifact:
    d = tmp / "in"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model, d / "model.pt")
    return Artifact("torch.module", d, "model.pt", "test", {"input_names": ["input"], **meta})


def context(tmp: Path, sig: InputSignature, host: Host | None = None) -> PassContext:
    work = tmp / "work"
    work.mkdir(parents=True, exist_ok=True)
    reg = default_registry()
    return PassContext(work, sig, host or Host(), RunnerFactory(reg.runners), reg, node="test")


def result_artifact(ctx: PassContext, result, kind: str) -> Artifact:
    return Artifact(kind, ctx.workdir, result.main, "test", result.meta)


# -- registry, option schemas, profiles -----------------------------------------------------------


def test_gpu_passes_register_with_valid_option_schemas():
    reg = default_registry()
    for name in ("trt_timing_cache", "trt_engine", "cuda_graph", "to_half", "trace", "script", "export"):
        p = reg.passes[name]
        Draft202012Validator.check_schema(p.options_schema)
        assert schema_issues(p.options_schema, apply_defaults(p.options_schema, {})) == [], name
    engine = apply_defaults(reg.passes["trt_engine"].options_schema, {})
    assert engine["workspace_mib"] == 1024 and engine["strongly_typed"] is True
    assert engine["tensorrt_versions"] == SUPPORTED_TENSORRT
    bad = [
        ("trt_engine", {"workspace_mib": 8}),
        ("trt_engine", {"optimization_level": 6}),
        ("trt_engine", {"int8_calibrator": "x"}),  # implicit quantization is not an option
        ("cuda_graph", {"batch_sizes": []}),
        ("cuda_graph", {"batch_sizes": [0]}),
        ("to_half", {"dtype": "int8"}),
        ("export", {"strict": "yes"}),
    ]
    for name, opts in bad:
        assert schema_issues(reg.passes[name].options_schema, opts), (name, opts)


def test_engine_needs_an_explicit_quantization_input_and_sm75():
    p = TrtEngine()
    assert p.inputs[0].kinds == ("onnx.qdq", "onnx")
    assert p.inputs[1].kinds == ("trt.timing_cache",) and p.inputs[1].optional
    assert set(p.requires) == {"cuda", "tensorrt", "sm>=75"}


def test_optimization_profile_takes_min_opt_max_from_dynamic_dims():
    sig = InputSignature.from_json(
        [
            {
                "name": "images",
                "shape": [2, 3, 224, 224],
                "dynamic": [
                    {"axis": 0, "name": "batch", "min": 1, "opt": 4, "max": 32},
                    {"axis": 2, "name": "h", "min": 128, "opt": 224, "max": 320},
                ],
            },
            {"name": "scale", "shape": [2, 1]},
        ]
    )
    prof = optimization_profile(sig)
    assert prof["images"] == ((1, 3, 128, 224), (4, 3, 224, 224), (32, 3, 320, 224))
    assert prof["scale"] == ((2, 1), (2, 1), (2, 1))  # a static input: min == opt == max


@pytest.mark.parametrize(
    "version, ok",
    [
        ("10.13.3.9", True),
        ("10.1.0", True),
        ("11.4.0.106", True),
        ("10.0.1", False),
        ("8.6.1", False),
        ("12.0.0", False),
        (None, False),
        ("garbage", False),
    ],
)
def test_supported_tensorrt_versions(version, ok):
    assert version_ok(version, SUPPORTED_TENSORRT) is ok


def test_int32_bias_dequantize_is_folded_for_tensorrt():
    """onnxruntime.quantization writes the Gemm/Conv bias as INT32 + DequantizeLinear, which
    TensorRT's parser refuses; folding it to float must not change the outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_q = rng.integers(-127, 128, (3, 4)).astype(np.int8)
    w_scale = np.array([0.01, 0.02, 0.03], np.float32)
    b_q = rng.integers(-5000, 5000, 3).astype(np.int32)
    b_scale = (w_scale * 0.05).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.int8(0), "x_zp"),
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zp"),
        numpy_helper.from_array(b_q, "b_q"),
        numpy_helper.from_array(b_scale, "b_scale"),
        numpy_helper.from_array(np.zeros(3, np.int32), "b_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], axis=0),
        helper.make_node("Gemm", ["xd", "w", "b"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((2, 4)).astype(np.float32)

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0]

    before = run(model)
    assert fold_int32_dequantize(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("DequantizeLinear") == 2  # activation and int8 weight stay
    names = {i.name for i in model.graph.initializer}
    assert "b" in names and not {"b_q", "b_scale", "b_zp"} & names
    np.testing.assert_allclose(run(model), before, rtol=1e-6, atol=1e-6)
    assert fold_int32_dequantize(model) == 0


# -- targets, lowering, plans on hosts described by overrides --------------------------------------


def test_gpu_target_profiles():
    reg = default_registry()
    for name, sm in (("t4", 75), ("a100", 80), ("h100", 90)):
        t = reg.targets[name]
        assert t.device == "cuda" and t.compute_capability == divmod(sm, 10)
        assert f"sm=={sm}" in t.capabilities
        assert set(t.runtimes) == {"tensorrt", "torch", "torch_tensorrt", "onnxruntime"}
        assert t.default_runtime == "tensorrt"
        assert {"int8", "fp32"} <= set(t.runtimes["tensorrt"]) and "fp16" in t.runtimes["torch"]
        engine_step = next(s for s in t.pipeline("tensorrt", "int8").steps if s.name == "trt_engine")
        assert engine_step.options["tensorrt_versions"] == SUPPORTED_TENSORRT
    generic = reg.targets["cuda"]
    assert generic.capabilities == ("cuda",) and generic.compute_capability is None
    assert generic.default_runtime == "torch"


def test_t4_plan_on_cpu_host_runs_through_quantize_and_blocks_engine(tmp_path):
    graph, reg = prepare(T4_RECIPE)
    plan = Executor(graph, reg, Store(tmp_path / "c"), Host(overrides=NO_GPU)).plan()
    status = {p.id: p for p in plan}
    first_blocked = next(p.id for p in plan if p.status == "blocked")
    assert first_blocked == "trt_engine"
    assert status["trt_timing_cache"].status == "run"
    assert {c for c, _ in status["trt_engine"].missing} == {"cuda", "tensorrt"}
    for node in ("trt_engine", "verify[trt_engine]", "cuda_graph", "verify[cuda_graph]", "benchmark"):
        assert status[node].status == "blocked", node
    assert graph.final == "cuda_graph"
    assert graph.by_id["trt_engine"].inputs == {"model": "quantize", "timing_cache": "trt_timing_cache"}


def test_gpu_target_verifies_runtimes_on_the_device_and_onnx_on_the_cpu():
    graph, _ = prepare(T4_RECIPE)
    by = graph.by_id
    assert by["verify[onnxsim]"].options["device"] == "cpu" and by["verify[quantize]"].options["device"] == "cpu"
    assert by["verify[trt_engine]"].options["device"] == "cuda"
    assert by["benchmark"].options["device"] == "cuda"
    assert "sm==75" in by["trt_engine"].requires and "sm==75" in by["benchmark"].requires
    assert "sm==75" not in by["quantize"].requires
    assert by["cuda_graph"].options["batch_sizes"] == [1, 8]  # example batch + benchmark batch sizes


def test_t4_engine_is_blocked_on_another_gpu():
    graph, _ = prepare(T4_RECIPE)
    blocked = unmet(graph, Host(overrides=A100_HOST))
    assert [c for c, _ in blocked["trt_engine"]] == ["sm==75"]
    assert "sm_80" in blocked["trt_engine"][0][1]
    assert unmet(graph, Host(overrides=T4_HOST)) == {}


def test_engine_cache_key_holds_tensorrt_version_gpu_name_and_sm(tmp_path):
    graph, reg = prepare(T4_RECIPE)
    keys = {}
    for label, over in (
        ("t4", T4_HOST),
        ("t4-trt11", {**T4_HOST, "tensorrt": "11.4.0.106"}),
        ("other-t4-name", {**T4_HOST, "cuda": {"name": "Tesla T4 (MIG)", "sm": 75, "count": 1}}),
    ):
        ex = Executor(graph, reg, Store(tmp_path / label), Host(overrides=over))
        keys[label] = {n.id: ex.key(n.id) for n in graph.nodes}
        if label == "t4":
            host_facts = ex._keys["trt_engine"][1]["material"]["host"]
            assert host_facts == {"gpu": "Tesla T4", "sm": 75, "tensorrt": "10.13.3.9"}
    for other in ("t4-trt11", "other-t4-name"):
        for node in ("trt_timing_cache", "trt_engine", "cuda_graph", "benchmark"):
            assert keys["t4"][node] != keys[other][node], (other, node)
        for node in ("onnxsim", "quantize", "verify[quantize]"):
            assert keys["t4"][node] == keys[other][node], (other, node)


def test_torch_fp16_plan_on_cpu_host(tmp_path):
    graph, reg = prepare(FP16_RECIPE)
    assert graph.runtime == "torch" and graph.final == "cuda_graph"
    ids = [n.id for n in graph.nodes]
    assert ids[ids.index("fuse_modules") :] == [
        "fuse_modules",
        "to_half",
        "verify[to_half]",
        "export",
        "verify[export]",
        "cuda_graph",
        "verify[cuda_graph]",
        "benchmark",
    ]
    plan = {p.id: p for p in Executor(graph, reg, Store(tmp_path / "c"), Host(overrides=NO_GPU)).plan()}
    for node in ("load_model", "reference", "fuse_modules", "to_half", "export"):
        assert plan[node].status == "run", node
    for node in ("verify[to_half]", "verify[export]", "cuda_graph", "verify[cuda_graph]", "benchmark"):
        assert plan[node].status == "blocked" and [c for c, _ in plan[node].missing] == ["cuda"], node
    assert graph.by_id["verify[to_half]"].options["device"] == "cuda"


def test_runners_are_registered_per_kind():
    runners = default_registry().runners
    assert runners["trt.engine"] is TrtEngineRunner
    assert runners["runtime.config"] is RuntimeConfigRunner
    for kind in ("torch.module", "torchscript", "torch.exported"):
        assert runners[kind] is TorchRunner


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a host without CUDA")
def test_gpu_runners_fail_clearly_without_cuda(tmp_path):
    factory = RunnerFactory(default_registry().runners)
    (tmp_path / "model.engine").write_bytes(b"not an engine")
    with pytest.raises(PassError, match="CUDA|tensorrt"):
        factory.make(Artifact("trt.engine", tmp_path, "model.engine", "x"), device="cuda")
    torch.save(tiny_net(), tmp_path / "model.pt")
    write_config(
        tmp_path, RuntimeConfig("torch", "model.pt", "torch.module", ("input",), ("float32",), (((1, 3, 16, 16),),))
    )
    with pytest.raises(RuntimeLoadError, match="needs a CUDA device"):
        factory.make(Artifact("runtime.config", tmp_path, CONFIG_NAME, "x"), device="cuda")


# -- runtime.json ------------------------------------------------------------------------------------


def test_runtime_config_round_trip_and_batch_index(tmp_path):
    cfg = RuntimeConfig(
        "tensorrt",
        "model.engine",
        "trt.engine",
        ("input",),
        ("float32",),
        (((1, 3, 224, 224),), ((8, 3, 224, 224),)),
        warmup=2,
    )
    (tmp_path / "model.engine").write_bytes(b"x")
    write_config(tmp_path, cfg)
    assert read_config(tmp_path) == cfg
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["shapes"] == [
        {"input": [1, 3, 224, 224]},
        {"input": [8, 3, 224, 224]},
    ]
    assert cfg.batch_index() == {1: 0, 8: 1}
    odd = RuntimeConfig(
        "torch", "m.pt", "torch.module", ("input",), ("float16",), (((1, 3, 224, 224),), ((1, 3, 320, 320),))
    )
    assert odd.batch_index() is None


def test_runtime_config_rejects_bad_files(tmp_path):
    with pytest.raises(RuntimeLoadError, match="not found"):
        read_config(tmp_path)
    bad = {
        "format": 2,
        "backend": "onnxruntime",
        "model": "../x.engine",
        "inputs": [{"name": "a"}],
        "shapes": [{"b": [1, 2]}],
        "warmup": -1,
    }
    (tmp_path / CONFIG_NAME).write_text(json.dumps(bad))
    with pytest.raises(RuntimeLoadError) as e:
        read_config(tmp_path)
    for part in ("format", "backend", "model", "shapes[0]", "warmup"):
        assert part in str(e.value), part
    good = RuntimeConfig("torch", "model.pt", "torch.module", ("input",), ("float32",), (((1, 4),),))
    write_config(tmp_path, good)
    with pytest.raises(RuntimeLoadError, match="model file model.pt is missing"):
        read_config(tmp_path)


def test_plan_chunks_prefers_the_largest_captured_batch():
    assert plan_chunks(16, [1, 8]) == [(8, True), (8, True)]
    assert plan_chunks(13, [1, 8]) == [(8, True)] + [(1, True)] * 5
    assert plan_chunks(13, [8]) == [(8, True), (5, False)]
    assert plan_chunks(3, [8]) == [(3, False)]
    assert plan_chunks(0, [1]) == []


def test_graph_shapes_per_batch_size():
    sig = signature((1, 1, 8))
    assert graph_shapes(sig, None) == [((1, 3, 16, 16),)]
    assert graph_shapes(sig, [1, 8]) == [((1, 3, 16, 16),), ((8, 3, 16, 16),)]
    with pytest.raises(PassError, match="outside"):
        graph_shapes(sig, [16])
    with pytest.raises(PassError, match="static batch"):
        graph_shapes(signature(None), [2])


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a host without CUDA")
def test_runtime_load_without_cuda_says_so(tmp_path):
    from accelc.runtime import load

    torch.save(tiny_net(), tmp_path / "model.pt")
    write_config(
        tmp_path, RuntimeConfig("torch", "model.pt", "torch.module", ("input",), ("float32",), (((1, 3, 16, 16),),))
    )
    with pytest.raises(RuntimeLoadError, match="needs a CUDA device"):
        load(tmp_path)


# -- the timing cache artifact -------------------------------------------------------------------------


def test_timing_cache_artifact_is_empty_or_the_seed_file(tmp_path):
    p = TrtTimingCache()
    ctx = context(tmp_path, signature())
    r = p.run(ctx, {}, {})
    assert (ctx.workdir / r.main).read_bytes() == b"" and r.metrics["seeded"] is False
    seed = tmp_path / "seed.cache"
    seed.write_bytes(b"\x01\x02timings")
    ctx2 = context(tmp_path / "b", signature())
    r2 = p.run(ctx2, {}, {"file": str(seed)})
    assert (ctx2.workdir / r2.main).read_bytes() == b"\x01\x02timings"
    host = Host(overrides=T4_HOST)
    k1 = p.key_material({"file": str(seed)}, host, None)
    seed.write_bytes(b"other timings")
    assert p.key_material({"file": str(seed)}, host, None) != k1
    assert k1["host"] == {"gpu": "Tesla T4", "sm": 75, "tensorrt": "10.13.3.9"}
    with pytest.raises(PassError, match="does not exist"):
        p.run(context(tmp_path / "c", signature()), {}, {"file": str(tmp_path / "nope")})


# -- PyTorch-native passes on the CPU -------------------------------------------------------------------


def _opts(p, **over):
    return apply_defaults(p.options_schema, over)


def test_to_half_casts_weights_and_runs_through_the_runner(tmp_path):
    model = tiny_net()
    ctx = context(tmp_path, signature())
    r = ToHalf().run(ctx, {"model": module_artifact(tmp_path, model)}, _opts(ToHalf()))
    assert r.meta["input_dtype"] == "float16" and r.metrics["dtype"] == "float16"
    half = torch.load(ctx.workdir / r.main, weights_only=False)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    (out,) = TorchRunner(result_artifact(ctx, r, "torch.module")).run({"input": x})
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 2e-2


def test_to_half_refuses_a_model_that_overflows_float16(tmp_path):
    big = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2), nn.Linear(2, 2)).eval()
    with torch.no_grad():  # 60000 fits float16 (max 65504); doubling it does not
        big[1].weight.zero_()
        big[1].bias.fill_(6e4)
        big[2].weight.copy_(2 * torch.eye(2))
        big[2].bias.zero_()
    with pytest.raises(PassError, match="non-finite.*bfloat16"):
        ToHalf().run(context(tmp_path, signature()), {"model": module_artifact(tmp_path, big)}, _opts(ToHalf()))
    r = ToHalf().run(
        context(tmp_path / "bf", signature()),
        {"model": module_artifact(tmp_path, big)},
        _opts(ToHalf(), dtype="bfloat16"),
    )
    assert r.meta["input_dtype"] == "bfloat16"


def test_trace_handles_torchscript_deprecation_and_checks_a_second_batch(tmp_path):
    ctx = context(tmp_path, signature((1, 1, 8)))
    assert example_batches(ctx.signature) == (2, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = Trace().run(ctx, {"model": module_artifact(tmp_path, tiny_net())}, _opts(Trace()))
    assert not [w for w in caught if "torch.jit" in str(w.message)], "the deprecation warning is recorded, not shown"
    assert r.metrics["checked_batches"] == [2, 1] and r.metrics["max_abs_diff"] < 1e-4
    assert isinstance(r.metrics["deprecated_upstream"], bool)
    with warnings.catch_warnings():  # TorchRunner's torch.jit.load is deprecated upstream
        warnings.simplefilter("ignore", FutureWarning)
        runner = TorchRunner(result_artifact(ctx, r, "torchscript"))
    (out,) = runner.run({"input": np.ones((3, 3, 16, 16), np.float32)})
    assert out.shape == (3, 5)


class _BakesBatch(nn.Module):
    """Reads the batch size as a Python int: tracing turns it into a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + torch.zeros(int(x.shape[0]), 4)


def test_trace_fails_when_the_batch_size_is_baked_in(tmp_path):
    art = module_artifact(tmp_path, _BakesBatch().eval())
    with pytest.raises(PassError, match="trace.*batch 1"):
        Trace().run(context(tmp_path, signature((1, 1, 8))), {"model": art}, _opts(Trace()))


def test_script_compiles_a_tiny_model(tmp_path):
    ctx = context(tmp_path, signature())
    r = Script().run(ctx, {"model": module_artifact(tmp_path, tiny_net())}, _opts(Script()))
    assert r.main == "model.ts" and r.metrics["checked_batches"] == [2, 1]


def test_export_keeps_the_batch_dynamic(tmp_path):
    ctx = context(tmp_path, signature((1, 1, 8)))
    model = tiny_net()
    r = Export().run(ctx, {"model": module_artifact(tmp_path, model)}, _opts(Export()))
    assert r.main == "model.pt2" and r.metrics["checked_batches"] == [2, 1]
    x = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    (out,) = TorchRunner(result_artifact(ctx, r, "torch.exported")).run({"input": x})
    assert np.abs(out - model(torch.from_numpy(x)).detach().numpy()).max() < 1e-4


# -- CUDA ---------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_graph_on_a_torch_model_and_runtime_load(tmp_path):
    from accelc.runtime import load

    sig = signature((1, 1, 8))
    model = tiny_net()
    ctx = context(tmp_path, sig)
    p = CudaGraph()
    r = p.run(ctx, {"model": module_artifact(tmp_path, model)}, _opts(p, batch_sizes=[1, 4], iterations=5))
    assert r.metrics["graphs"] == 2 and set(r.metrics["per_shape"]) == {"1", "4"}
    for m in r.metrics["per_shape"].values():
        assert m["max_abs_diff"] <= 1e-4 and m["graph_p50_ms"] > 0 and m["eager_p50_ms"] > 0
    pred = load(ctx.workdir)
    x = torch.randn(4, 3, 16, 16)
    (y,) = pred(x)
    ref = model.cuda()(x.cuda())
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-3)
    with pytest.raises(RuntimeLoadError, match="no CUDA graph"):
        pred(torch.randn(3, 3, 16, 16))
    runner = RuntimeConfigRunner(Artifact("runtime.config", ctx.workdir, r.main, "x", r.meta))
    (out,) = runner.run({"input": np.random.default_rng(0).standard_normal((9, 3, 16, 16)).astype(np.float32)})
    assert out.shape == (9, 5) and runner.graph_calls == 3 and runner.eager_calls == 0  # 4 + 4 + 1


@needs_cuda
def test_fp16_export_replays_in_a_cuda_graph(tmp_path):
    sig = signature((1, 1, 8))
    half = ToHalf().run(context(tmp_path / "h", sig), {"model": module_artifact(tmp_path, tiny_net())}, _opts(ToHalf()))
    hctx = context(tmp_path / "h", sig)
    exp_ctx = context(tmp_path / "e", sig)
    exp = Export().run(exp_ctx, {"model": result_artifact(hctx, half, "torch.module")}, _opts(Export()))
    g_ctx = context(tmp_path / "g", sig)
    r = CudaGraph().run(
        g_ctx,
        {"model": result_artifact(exp_ctx, exp, "torch.exported")},
        _opts(CudaGraph(), batch_sizes=[2], iterations=3),
    )
    assert read_config(g_ctx.workdir).input_dtypes == ("float16",)
    assert r.metrics["per_shape"]["2"]["max_abs_diff"] < 1e-2


# -- TensorRT -----------------------------------------------------------------------------------------


def _tiny_onnx(path: Path) -> np.ndarray:
    """(batch, 4) -> relu(x @ W): an ONNX graph with a dynamic batch; returns W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["y"]), helper.make_node("Relu", ["y"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return w


@needs_trt
def test_trt_engine_builds_with_a_profile_and_a_timing_cache(tmp_path):
    sig = InputSignature.from_json(
        [{"name": "input", "shape": [1, 4], "dynamic": [{"axis": 0, "name": "batch", "min": 1, "opt": 2, "max": 16}]}]
    )
    src = tmp_path / "src"
    src.mkdir()
    w = _tiny_onnx(src / "model.onnx")
    onnx_art = Artifact("onnx", src, "model.onnx", "x", {"input_names": ["input"]})
    ctx = context(tmp_path / "a", sig)
    cache_r = TrtTimingCache().run(ctx, {}, {})
    cache_art = result_artifact(ctx, cache_r, "trt.timing_cache")
    ectx = context(tmp_path / "b", sig)
    p = TrtEngine()
    r = p.run(ectx, {"model": onnx_art, "timing_cache": cache_art}, _opts(p, workspace_mib=64))
    assert r.metrics["timing_cache_bytes_out"] > 0 and r.meta["profile"]["input"] == [[1, 4], [2, 4], [16, 4]]
    runner = TrtEngineRunner(result_artifact(ectx, r, "trt.engine"))
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    (out,) = runner.run({"input": x})
    assert np.abs(out - np.maximum(x @ w, 0)).max() < 1e-3
    g_ctx = context(tmp_path / "g", sig)
    g = CudaGraph().run(
        g_ctx, {"model": result_artifact(ectx, r, "trt.engine")}, _opts(CudaGraph(), batch_sizes=[1, 8], iterations=3)
    )
    assert g.metrics["graphs"] == 2 and (g_ctx.workdir / "model.engine").is_file()
    assert (g_ctx.workdir / "timing.cache").is_file()
