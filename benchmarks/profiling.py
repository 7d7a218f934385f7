"""Where the batch-1 time goes: operator profiles of the variants, MAC counts and the GEMM peaks
they are compared with."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.summary import op_profile, ort_profile_summary, ov_profile_summary
from benchmarks.variants import OpenVinoCall, OrtCall, Skip, load_model, make_call, ort_session_options, time_block


def count_macs(model: Any, feeds: dict[str, np.ndarray], names: list[str]) -> int:
    """Multiply-accumulates of one forward pass in ``nn.Conv2d`` and ``nn.Linear`` layers (hooks)."""
    import torch

    total = 0

    def hook(mod: Any, _inp: Any, out: Any) -> None:
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, torch.nn.Linear):
            total += out.numel() * mod.in_features

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.inference_mode():
            model(*[torch.from_numpy(feeds[n]).to(device) for n in names])
    finally:
        for h in handles:
            h.remove()
    return total


def gemm_peaks(threads: int, repeats: int = 20, size: int = 1024) -> dict[str, float]:
    """The machine's practical matrix-multiply peaks with ONNX Runtime's kernels at ``threads``:
    ``int8_gops`` (``MatMulInteger``, u8 x s8, the VNNI path) and ``fp32_gflops`` (``MatMul``),
    from the fastest of ``repeats`` x 10 calls at ``size``³ (2 operations per MAC). The fastest
    call is the least disturbed by other processes; on a busy machine it still reads low."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    cases = {
        "int8_gops": (
            "MatMulInteger",
            TensorProto.UINT8,
            rng.integers(-127, 127, (size, size), dtype=np.int8),
            TensorProto.INT32,
            rng.integers(0, 255, (size, size), dtype=np.uint8),
        ),
        "fp32_gflops": (
            "MatMul",
            TensorProto.FLOAT,
            rng.standard_normal((size, size), dtype=np.float32),
            TensorProto.FLOAT,
            rng.standard_normal((size, size), dtype=np.float32),
        ),
    }
    out = {}
    for key, (op, a_type, b, y_type, a) in cases.items():
        graph = helper.make_graph(
            [helper.make_node(op, ["A", "B"], ["Y"])],
            "gemm",
            [helper.make_tensor_value_info("A", a_type, [size, size])],
            [helper.make_tensor_value_info("Y", y_type, [size, size])],
            [numpy_helper.from_array(b, "B")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        sess = ort.InferenceSession(
            model.SerializeToString(), ort_session_options(threads), providers=["CPUExecutionProvider"]
        )
        run = sess.run
        best = min(min(time_block(lambda f, run=run: run(None, f), {"A": a}, 2, 10)) for _ in range(repeats))
        out[key] = 2.0 * size**3 / best / 1e9
    return out


def profile_variant(
    name: str,
    spec: dict[str, Any],
    feeds_1: dict[str, np.ndarray],
    work: Path,
    runs: int,
) -> dict[str, Any]:
    """Where ``name``'s batch-1 time goes, per operator type (``benchmarks.summary.op_profile``),
    run in a worker process of its own: ONNX Runtime's node profile for the ONNX variants,
    OpenVINO's per-layer counters for the OpenVINO ones (``benchmarks.summary.ov_profile_summary``),
    torch.profiler's top-level operators for eager FP32 (each run inside a ``record_function`` so
    operators are matched across runs). Times in ms per run; ``kernels_min_ms`` is the noise-robust
    sum of per-node minimums. Returns ``{"profile": summary | None (nothing to profile for this
    variant, or it cannot run here), "macs": conv/linear MACs per sample (eager only) | None}``."""
    threads, device = spec["threads"], spec["device"]
    art = spec.get("accelc") or {}
    ov_path: tuple[str | None, str | None] | None = None
    if name == "ov_fp32":
        ov_path = (spec.get("ort_fp32"), None)
    elif name == "accelc" and art.get("kind") == "openvino.ir":
        ov_path = (str(Path(art["path"]) / art["main"]), art.get("meta", {}).get("inference_precision", "f32"))
    if ov_path is not None:
        path, precision = ov_path
        if not path:
            return {"profile": None, "macs": None}
        try:
            ov_call = OpenVinoCall(path, threads, device, precision=precision, profile=True)
        except Skip:
            return {"profile": None, "macs": None}
        ov_call(feeds_1)  # the first, cold, run is left out
        infos, wall = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            ov_call(feeds_1)
            wall.append((time.perf_counter() - t0) * 1e3)
            infos.append(ov_call.request.profiling_info)
        return {"profile": ov_profile_summary(infos, wall), "macs": None}
    onnx_path = None
    if name in ("ort_fp32", "ort_int8_qs"):
        onnx_path = spec.get(name)
    elif name == "accelc" and str(art.get("kind", "")).startswith("onnx"):
        onnx_path = str(Path(art["path"]) / art["main"])
    if onnx_path:
        try:
            call = OrtCall(onnx_path, threads, device, profile_prefix=str(work / f"profile-{name}"))
        except Skip:
            return {"profile": None, "macs": None}
        for _ in range(runs + 1):  # the first, cold, run is left out of the summary
            call(feeds_1)
        return {"profile": ort_profile_summary(json.loads(Path(call.session.end_profiling()).read_text())),
                "macs": None}
    if name != "eager":
        return {"profile": None, "macs": None}
    import torch

    from accelc.recipe import load_recipe
    from accelc.registry import default_registry

    recipe = load_recipe(spec["recipe"], default_registry())
    model = load_model(recipe)
    eager = make_call("eager", spec, recipe, model=model)
    eager(feeds_1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(runs):
            with torch.profiler.record_function(f"bench-run-{i}"):
                eager(feeds_1)
    per_node: dict[tuple[str, str], list[float]] = {}
    run_us = []
    for e in prof.events():
        if e.name.startswith("bench-run-"):
            run_us.append(e.cpu_time_total)
            for k, child in enumerate(e.cpu_children):
                per_node.setdefault((child.name, str(k)), []).append(child.cpu_time_total)
    out = op_profile(per_node, runs)
    out["run_ms"] = float(np.mean(run_us)) / 1e3 if run_us else None
    out["overhead_ms"] = None
    return {"profile": out, "macs": count_macs(model, feeds_1, recipe.signature.names)}
