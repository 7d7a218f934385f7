"""ONNX Runtime on NVIDIA GPUs: execution-provider selection, the ``ort_gpu_session`` pass and its runner.

ONNX Runtime's GPU build is the ``onnxruntime-gpu`` wheel (:data:`ONNXRUNTIME_GPU`, the same
release as the CPU ``onnxruntime`` pin, built for CUDA 13 like the pinned torch). It *replaces* the
CPU ``onnxruntime`` wheel: both install the same ``onnxruntime`` package, so they cannot share an
environment (docs/gpu.md says how to switch). Its providers:

* ``CUDAExecutionProvider``: runs the graph's own types (an FP32 graph in FP32; a Q/DQ graph's
  quantize/dequantize ops in float, so INT8 brings no speed here);
* ``TensorrtExecutionProvider``: builds TensorRT engines for the subgraphs TensorRT supports. It is
  listed by ``get_available_providers()`` whenever the wheel was built with it, even when TensorRT's
  libraries are absent (the session then drops it with an error in the log), so it is only
  requested where TensorRT is installed (``tensorrt_installed``), and the session's
  ``get_providers()`` is checked afterwards. Options per target/precision: ``device_id``,
  ``trt_fp16_enable``, ``trt_int8_enable`` (Q/DQ graphs: explicit quantization, no calibration
  table), ``trt_engine_cache_enable``/``trt_engine_cache_path`` (a folder per GPU, compute
  capability, ONNX Runtime and TensorRT version: ONNX Runtime's documentation says a cache must not
  be reused across those), ``trt_timing_cache_enable``, ``trt_max_workspace_size`` and the
  optimization profile (``trt_profile_min_shapes``/``opt``/``max``) from the recipe's dynamic axes.
* ``CPUExecutionProvider``: always last, for nodes neither GPU provider takes.

:func:`select_providers` is a pure function of the available providers list, so provider choice
is tested on any host. The ``ort_gpu_session`` pass records a target's provider request next to a
copy of the ONNX file (kind ``ort.session``) after checking on the GPU that the session gets the
providers it asked for; :class:`OrtSessionRunner` runs that artifact for ``verify`` and ``benchmark``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.environment import package_version
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot
from accelc.passes.tensorrt import tensorrt_version
from accelc.signature import InputSignature

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
#: The GPU build of ONNX Runtime, pinned to the same release as the CPU ``onnxruntime`` pin.
ONNXRUNTIME_GPU = "onnxruntime-gpu==1.31.1"
SESSION_FILE = "session.json"
SESSION_FORMAT = 1

#: A provider entry as ``onnxruntime.InferenceSession(providers=...)`` takes it.
ProviderEntry = tuple[str, dict[str, str]]

INSTALL_HINT = (
    f"replace the CPU wheel with the GPU build in this environment: pip uninstall -y onnxruntime && "
    f"pip install {ONNXRUNTIME_GPU} (docs/gpu.md)"
)


class ProviderError(PassError):
    """The providers a session needs are not available in this ONNX Runtime build or host."""


@dataclass(frozen=True)
class ProviderRequest:
    """What a target and precision ask of ONNX Runtime on a GPU.

    Attributes:
        device_id: CUDA device ordinal.
        tensorrt: ``auto`` (TensorRT EP first where TensorRT is installed), ``on`` (required: an
            error without it) or ``off`` (CUDA EP only).
        fp16: ``trt_fp16_enable`` (TensorRT may pick FP16 kernels for an FP32 graph).
        int8: ``trt_int8_enable`` (a Q/DQ graph: explicit quantization; no calibration table).
        engine_cache_dir: ``trt_engine_cache_path`` and ``trt_timing_cache_path`` (``None``: no caches).
        workspace_mib: ``trt_max_workspace_size`` in MiB (``None``: ONNX Runtime's default).
        profile: ``{input: (min, opt, max) shapes}``, the TensorRT optimization profile for dynamic inputs.
    """

    device_id: int = 0
    tensorrt: str = "auto"
    fp16: bool = False
    int8: bool = False
    engine_cache_dir: str | None = None
    workspace_mib: int | None = None
    profile: dict[str, tuple[tuple[int, ...], ...]] | None = None


def _flag(value: bool) -> str:
    return "True" if value else "False"  # TensorRT EP parses exactly True/true/False/false


def _shapes(profile: dict[str, tuple[tuple[int, ...], ...]], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[which]))}" for name, shapes in profile.items())


def select_providers(
    available: Sequence[str],
    device: str = "cpu",
    request: ProviderRequest | None = None,
    tensorrt_installed: bool = False,
    strict: bool = False,
) -> list[str | ProviderEntry]:
    """The ``providers`` argument for an ``InferenceSession``, most preferred first.

    Args:
        available: ``onnxruntime.get_available_providers()`` of the installed build.
        device: ``cpu`` (CPU EP only) or ``cuda``.
        request: the target's provider options (default: :class:`ProviderRequest` defaults).
        tensorrt_installed: whether TensorRT's libraries are on this host (the ``tensorrt`` package);
            the TensorRT EP is requested only then.
        strict: on ``cuda``, raise instead of falling back to the CPU when the CUDA EP is missing.

    Returns:
        ``[("TensorrtExecutionProvider", {...})?, ("CUDAExecutionProvider", {"device_id": ...}),
        "CPUExecutionProvider"]`` on a GPU build; ``["CPUExecutionProvider"]`` otherwise (unless strict).

    Raises:
        ProviderError: ``strict`` and no CUDA EP; or ``request.tensorrt == "on"`` and the TensorRT EP is
            not available or TensorRT is not installed.
        ValueError: an unknown ``device`` or ``request.tensorrt``.
    """
    req = request or ProviderRequest()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if req.tensorrt not in ("auto", "on", "off"):
        raise ValueError(f"tensorrt must be 'auto', 'on' or 'off', got {req.tensorrt!r}")
    if device == "cpu":
        return [CPU_EP]
    if CUDA_EP not in available:
        if strict or req.tensorrt == "on":
            raise ProviderError(
                f"this ONNX Runtime build has no {CUDA_EP} (available: {', '.join(available) or 'none'}); "
                f"{INSTALL_HINT}"
            )
        return [CPU_EP]
    out: list[str | ProviderEntry] = []
    trt_usable = TRT_EP in available and tensorrt_installed
    if req.tensorrt == "on" and not trt_usable:
        why = "TensorRT is not installed" if TRT_EP in available else f"this ONNX Runtime build has no {TRT_EP}"
        raise ProviderError(f"the TensorRT execution provider is required here, but {why} "
                            "(install the gpu extra's tensorrt-cu13; docs/gpu.md)")
    if req.tensorrt != "off" and trt_usable:
        opts = {"device_id": str(req.device_id), "trt_fp16_enable": _flag(req.fp16),
                "trt_int8_enable": _flag(req.int8)}
        if req.engine_cache_dir:
            opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=req.engine_cache_dir,
                        trt_timing_cache_enable="True", trt_timing_cache_path=req.engine_cache_dir)
        if req.workspace_mib:
            opts["trt_max_workspace_size"] = str(req.workspace_mib << 20)
        if req.profile:
            opts.update(trt_profile_min_shapes=_shapes(req.profile, 0), trt_profile_opt_shapes=_shapes(req.profile, 1),
                        trt_profile_max_shapes=_shapes(req.profile, 2))
        out.append((TRT_EP, opts))
    out.append((CUDA_EP, {"device_id": str(req.device_id)}))
    out.append(CPU_EP)
    return out


def provider_names(providers: Sequence[str | ProviderEntry]) -> list[str]:
    """Just the names of a :func:`select_providers` list."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def installed_onnxruntime() -> tuple[str | None, str | None]:
    """``(distribution, version)`` of the installed ONNX Runtime: ``onnxruntime-gpu`` or ``onnxruntime``
    (``(None, None)`` when neither is installed). Read from metadata; nothing is imported."""
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        v = package_version(dist)
        if v:
            return dist, v
    return None, None


def engine_cache_dir(root: str | Path, gpu: str | None, sm: int | None, ort_version: str | None,
                     trt_version: str | None) -> Path:
    """The TensorRT EP engine/timing cache folder for one GPU model, compute capability, ONNX Runtime
    and TensorRT version under ``root`` (ONNX Runtime's cache files are not valid across any of those)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu or "gpu").strip("-").lower()
    return Path(root) / f"{slug}-sm{sm}-ort{ort_version}-trt{trt_version}"


def default_engine_cache_root() -> Path:
    """``$ACCELC_CACHE_DIR`` (or the user cache dir) ``/ort-trt-engines``: outside the content-addressed
    store, whose entries must not change after they are written."""
    from accelc.cache import default_root

    return default_root() / "ort-trt-engines"


def _tensorrt_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _profile(signature: InputSignature | None) -> dict[str, tuple[tuple[int, ...], ...]] | None:
    if signature is None:
        return None
    from accelc.passes.tensorrt import optimization_profile

    prof = {k: v for k, v in optimization_profile(signature).items() if v[0] != v[2]}
    return prof or None


class OrtGpuSession(Pass):
    """ONNX Runtime on the GPU: check that a session gets the requested providers and record them
    (``ort.session``: ``session.json`` plus a copy of ``model.onnx``).

    On the GPU it creates the session (the TensorRT EP builds its engines into the engine cache
    here, so a later load reuses them), checks ``session.get_providers()`` against the request and
    runs one example batch. ``verify`` and ``benchmark`` then run the artifact through
    :class:`OrtSessionRunner` with the same providers.

    Raises ``ProviderError`` when this ONNX Runtime build has no CUDA EP (the CPU wheel), when
    ``tensorrt: on`` and the TensorRT EP cannot be used, or when the session dropped a requested provider.
    """

    name = "ort_gpu_session"
    version = "1"
    inputs = (Slot("model", ("onnx.qdq", "onnx")),)
    produces = "ort.session"
    requires = ("cuda",)
    env_packages = ("onnxruntime-gpu", "onnxruntime", "tensorrt", "tensorrt-cu12", "tensorrt-cu13")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "device_id": {"type": "integer", "minimum": 0, "default": 0},
            "tensorrt": {"enum": ["auto", "on", "off"], "default": "auto",
                         "description": "TensorRT EP: where installed (auto), required (on) or never (off)."},
            "fp16": {"type": "boolean", "default": False, "description": "trt_fp16_enable."},
            "int8": {"type": "boolean", "default": False,
                     "description": "trt_int8_enable (a Q/DQ graph: explicit quantization)."},
            "engine_cache": {"type": "boolean", "default": True,
                             "description": "TensorRT EP engine and timing caches (per GPU and versions)."},
            "workspace_mib": {"type": "integer", "minimum": 16, "default": 1024},
        },
    }

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        cuda = host.cuda or {}
        dist, ver = installed_onnxruntime()
        return {"gpu": cuda.get("name"), "sm": cuda.get("sm"), "onnxruntime": f"{dist} {ver}",
                "tensorrt": tensorrt_version(host)}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        model = inputs["model"]
        shutil.copyfile(model.file, ctx.workdir / "model.onnx")
        config = {
            "format": SESSION_FORMAT,
            "model": "model.onnx",
            "options": dict(options),
            "profile": {k: [list(s) for s in v] for k, v in (_profile(ctx.signature) or {}).items()},
        }
        (ctx.workdir / SESSION_FILE).write_text(json.dumps(config, indent=1))
        runner = OrtSessionRunner(Artifact("ort.session", ctx.workdir, SESSION_FILE, "", model.meta), host=ctx.host)
        x = {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], _np_dtype(i.type))
             for i in runner.session.get_inputs()}
        ctx.progress("running one batch on " + ", ".join(runner.providers))
        runner.run(x)
        cuda = ctx.host.cuda or {}
        dist, ver = installed_onnxruntime()
        metrics = {"providers": runner.providers, "requested": runner.requested, "onnxruntime": f"{dist} {ver}",
                   "tensorrt": tensorrt_version(ctx.host), "gpu": cuda.get("name"), "sm": cuda.get("sm")}
        return PassResult(SESSION_FILE, metrics=metrics, meta={**model.meta, "providers": runner.providers})


def _np_dtype(ort_type: str) -> Any:
    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
    return table.get(ort_type, np.float32)


def read_session_config(directory: Path) -> dict[str, Any]:
    """``directory/session.json``, checked. Raises :class:`PassError` naming the file and the problem."""
    path = Path(directory) / SESSION_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PassError(f"{path}: cannot read it as JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("format") != SESSION_FORMAT or not isinstance(cfg.get("model"), str):
        raise PassError(f"{path}: expected format {SESSION_FORMAT} with a 'model' file name")
    if "/" in cfg["model"] or not (path.parent / cfg["model"]).is_file():
        raise PassError(f"{path}: model file {cfg['model']!r} is missing from {path.parent}")
    return cfg


def request_from_config(cfg: dict[str, Any], host: Any, cache_root: Path | None = None) -> ProviderRequest:
    """The :class:`ProviderRequest` a ``session.json`` stands for on ``host`` (its engine cache folder
    is this host's, from its GPU and versions)."""
    opts = cfg.get("options", {})
    cache = None
    if opts.get("engine_cache", True):
        cuda = host.cuda or {}
        cache = str(engine_cache_dir(cache_root or default_engine_cache_root(), cuda.get("name"), cuda.get("sm"),
                                     installed_onnxruntime()[1], tensorrt_version(host)))
    profile = {k: tuple(tuple(s) for s in v) for k, v in (cfg.get("profile") or {}).items()} or None
    return ProviderRequest(device_id=opts.get("device_id", 0), tensorrt=opts.get("tensorrt", "auto"),
                           fp16=opts.get("fp16", False), int8=opts.get("int8", False), engine_cache_dir=cache,
                           workspace_mib=opts.get("workspace_mib"), profile=profile)


class OrtSessionRunner:
    """Runs an ``ort.session`` artifact with the providers its ``session.json`` requests on this host.

    Raises :class:`ProviderError` when the CUDA EP is missing (the CPU wheel is installed) or the
    session did not register a requested GPU provider (``get_providers()`` is checked).
    """

    def __init__(self, artifact: Artifact, device: str = "cuda", threads: int | None = None, host: Any = None):
        import onnxruntime as ort

        from accelc.host import Host
        from accelc.passes.onnxruntime import ort_session

        host = host or Host()
        cfg = read_session_config(artifact.path)
        request = request_from_config(cfg, host)
        providers = select_providers(ort.get_available_providers(), "cuda", request,
                                     tensorrt_installed=_tensorrt_installed(), strict=True)
        self.requested = provider_names(providers)
        if request.engine_cache_dir and TRT_EP in self.requested:
            Path(request.engine_cache_dir).mkdir(parents=True, exist_ok=True)
        self.session = ort_session(artifact.path / cfg["model"], threads, "cuda", providers=providers)
        self.providers = list(self.session.get_providers())
        dropped = [p for p in self.requested if p != CPU_EP and p not in self.providers]
        if dropped:
            raise ProviderError(f"ONNX Runtime did not register {', '.join(dropped)} (got {self.providers}); "
                                "its log says why (missing CUDA/cuDNN/TensorRT libraries?)")
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self.session.run(None, feeds)]
