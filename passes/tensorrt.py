"""TensorRT: ``trt_timing_cache``, ``trt_engine`` and the engine runner.

``trt_engine`` builds a serialized engine from a (Q/DQ) ONNX graph with the TensorRT
Python API, by explicit quantization only: INT8 comes from the graph's
QuantizeLinear/DequantizeLinear pairs and FP16 from an FP16 graph, both under a
strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``). No
builder precision flag and no ``IInt8Calibrator`` is used: TensorRT 10.1 deprecated
implicit INT8 quantization, and TensorRT 11 removed it along with the weakly typed flags.
Constant INT32 ``DequantizeLinear`` nodes (quantized biases), which TensorRT's parser
refuses, are folded to float first (:func:`fold_int32_dequantize`).

* one optimization profile from the recipe's dynamic dimensions (min/opt/max);
* a workspace limit (``IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE)``);
* a timing cache that is its own artifact (``trt.timing_cache``, made by
  ``trt_timing_cache``) fed in through an optional input slot; the updated cache is
  stored next to the engine so a later build can be seeded with it;
* the cache key holds the TensorRT version, the GPU name and its compute capability,
  because an engine only runs on the device (and TensorRT version) that built it.

:class:`TrtModule` executes an engine on CUDA tensors (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3`` on a torch stream); :class:`TrtEngineRunner`
wraps it for ``verify`` and ``benchmark``. Nothing here imports ``tensorrt`` at module
import time, so the plugin loads on hosts without it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from accelc.artifacts import Artifact, sha256_file
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot
from accelc.signature import InputSignature

#: TensorRT releases the built-in GPU profiles accept: 10.1 is the first release in which
#: implicit INT8 is deprecated (explicit Q/DQ is the supported path); every 10.x from 10.5 on
#: and 11.x support sm_75 (Turing, T4) to sm_90 (Hopper); 10.5 dropped sm_70 (Volta).
#: 12.x is excluded until it has been tried.
SUPPORTED_TENSORRT = ">=10.1,<12"

ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"

log = logging.getLogger("accelc.tensorrt")


def optimization_profile(
    signature: InputSignature,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``{input name: (min shape, opt shape, max shape)}`` for one TensorRT optimization profile.

    Each dynamic axis takes its ``min``/``opt``/``max`` size from the recipe; every other axis
    keeps the example shape's size (so a static input has ``min == opt == max``).
    """
    out = {}
    for spec in signature.inputs:
        out[spec.name] = tuple(
            spec.shape_with(**{d.name: getattr(d, which) for d in spec.dynamic}) for which in ("min", "opt", "max")
        )
    return out


def version_ok(version: str | None, spec: str) -> bool:
    """Whether TensorRT ``version`` (e.g. ``"10.13.3.9"``) satisfies the specifier set ``spec``
    (``">=10.1,<12"``). ``None`` (not installed) and unparsable versions never do."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not version:
        return False
    try:
        return Version(version) in SpecifierSet(spec)
    except (InvalidVersion, InvalidSpecifier):
        return False


def installed_tensorrt() -> str | None:
    """The installed TensorRT's version from distribution metadata (nothing is imported), or ``None``."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec("tensorrt") is None:
        return None
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu12"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def tensorrt_version(host: Any) -> str | None:
    """This host's TensorRT version (the ``tensorrt`` fact, so a test can describe another host)."""
    return host.fact("tensorrt", installed_tensorrt)


def tensorrt_probe(host: Any, op: str | None, value: int | None) -> tuple[bool, str]:
    """The ``tensorrt`` host capability: the Python package is installed."""
    v = tensorrt_version(host)
    return (v is not None), (f"TensorRT {v}" if v else "Python package tensorrt not installed")


def _device_key(host: Any) -> dict[str, Any]:
    cuda = host.cuda or {}
    return {"gpu": cuda.get("name"), "sm": cuda.get("sm"), "tensorrt": tensorrt_version(host)}


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:  # the plan blocks such hosts; this is for direct library use
        raise PassError(f"the Python package tensorrt cannot be imported: {e}") from e
    return trt


@functools.cache
def trt_logger() -> Any:
    """The process-wide ``tensorrt.ILogger`` (TensorRT keeps the first logger it is given), forwarding
    TensorRT's messages to the ``accelc.tensorrt`` logger (errors and warnings at their level, the
    rest at DEBUG). Error messages are kept only inside :meth:`capture` blocks, by the caller that
    opened them, so nothing accumulates across builds."""
    trt = _trt()

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._sinks: list[list[str]] = []

        @contextlib.contextmanager
        def capture(self) -> Iterator[list[str]]:
            """The TensorRT error messages logged during the block, as a list the caller owns."""
            sink: list[str] = []
            self._sinks.append(sink)
            try:
                yield sink
            finally:
                self._sinks.remove(sink)

        def log(self, severity: Any, msg: str) -> None:
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                for sink in self._sinks:
                    sink.append(msg)
                log.error(msg)
            elif severity == sev.WARNING:
                log.warning(msg)
            else:
                log.debug(msg)

    return _Logger()


class TrtTimingCache(Pass):
    """Provide the TensorRT timing cache that ``trt_engine`` starts from (``trt.timing_cache``).

    Without ``file`` the artifact is an empty file: TensorRT starts with no measured
    tactics. With ``file`` (a ``timing.cache`` written by an earlier build, e.g. from its
    out dir) the bytes are stored as they are; ``trt_engine`` hands them to TensorRT, which
    rejects a cache from another device or TensorRT version. The key holds the file's
    sha256 and this host's GPU and TensorRT version, so every build on one device reuses
    the same entry.
    """

    name = "trt_timing_cache"
    version = "1"
    produces = "trt.timing_cache"
    final = False
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "file": {
                "type": "string",
                "minLength": 1,
                "description": "Serialized timing cache to start from (absolute, or relative to the working dir).",
            },
        },
    }

    def key_material(self, options: dict[str, Any], host: Any, sources: Any) -> dict[str, Any]:
        seed = None
        if options.get("file"):
            p = Path(options["file"])
            seed = sha256_file(p) if p.is_file() else f"missing:{p}"
        return {"seed_sha256": seed, "host": _device_key(host)}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        out = ctx.workdir / TIMING_CACHE_FILE
        if options.get("file"):
            src = Path(options["file"])
            if not src.is_file():
                raise PassError(f"trt_timing_cache.file: {src} does not exist")
            out.write_bytes(src.read_bytes())
        else:
            out.write_bytes(b"")
        return PassResult(TIMING_CACHE_FILE, metrics={"bytes": out.stat().st_size, "seeded": bool(options.get("file"))})


def _parser_error(err: Any) -> str:
    desc = err.desc() if hasattr(err, "desc") else str(err)
    node = err.node_name() if hasattr(err, "node_name") else ""
    return f"{node}: {desc}" if node else str(desc)


def fold_int32_dequantize(model: Any) -> int:
    """Replace every ``DequantizeLinear`` of a constant INT32 tensor (the quantized Conv/Gemm
    bias that ``onnxruntime.quantization`` writes) by its float result, in place; returns how
    many were folded.

    TensorRT's DequantizeLayer takes INT8/FP8/INT4 inputs only and rejects the INT32 bias
    ("only activation types allowed as input to this layer"); TensorRT fuses the float bias
    into the INT8 convolution itself. ``y = (x - zero_point) * scale`` per ONNX, with per-axis
    scales broadcast along ``axis``, in the scale's dtype. Initializers no longer used are removed.
    """
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    folded, new_inits, dropped = 0, [], []
    for node in list(model.graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        if inits[node.input[0]].data_type != TensorProto.INT32:
            continue
        params = [i for i in node.input[1:] if i]
        if not all(i in inits for i in params):
            continue
        x = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(params) > 1 else 0.0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        s64 = scale.astype(np.float64)
        if scale.size > 1:
            shape = [1] * x.ndim
            shape[axis % x.ndim] = -1
            s64 = s64.reshape(shape)
            zp = np.reshape(zp, shape) if np.ndim(zp) else zp
        y = ((x - zp) * s64).astype(scale.dtype)
        new_inits.append(numpy_helper.from_array(y, node.output[0]))
        model.graph.node.remove(node)
        dropped.extend(node.input)
        folded += 1
    if folded:
        model.graph.initializer.extend(new_inits)
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        for name in set(dropped):
            if name in inits and name not in used:
                model.graph.initializer.remove(inits[name])
    return folded


def _count_qdq(model: Any) -> int:
    return sum(1 for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def _int8_layers(engine: Any, trt: Any) -> int | None:
    """Layers with an INT8 input or output, from the engine inspector (needs detailed profiling
    verbosity; ``None`` when the inspector gives no layer list)."""
    try:
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:  # the inspector's JSON layout changed between 10.x and 11.x; this metric is informative only
        return None
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        return None
    return sum(1 for layer in layers if "int8" in json.dumps(layer).lower())


class TrtEngine(Pass):
    """Build a TensorRT engine by explicit quantization (Q/DQ nodes carry INT8; FP16 from an FP16 graph).

    The network is parsed from ONNX into a strongly typed network, after folding the INT32
    bias DequantizeLinear nodes TensorRT rejects (:func:`fold_int32_dequantize`); one
    optimization profile covers the recipe's dynamic dimensions (min/opt/max). Metrics: build time,
    engine size, Q/DQ node count, INT8 layers (from the engine inspector), timing-cache
    sizes. The updated timing cache is written as ``timing.cache`` next to ``model.engine``.

    Raises ``PassError`` when the installed TensorRT is outside ``tensorrt_versions``,
    when the ONNX parser rejects the graph (with the parser's messages), or when the
    builder returns no engine (with TensorRT's error log).
    """

    name = "trt_engine"
    version = "2"
    inputs = (Slot("model", ("onnx.qdq", "onnx")), Slot("timing_cache", ("trt.timing_cache",), optional=True))
    produces = "trt.engine"
    requires = ("cuda", "tensorrt", "sm>=75")
    env_packages = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")
    key_ignores = ("tensorrt_versions",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "workspace_mib": {
                "type": "integer",
                "minimum": 16,
                "default": 1024,
                "description": "Builder workspace limit (MemoryPoolType.WORKSPACE), MiB.",
            },
            "optimization_level": {
                "type": "integer",
                "minimum": 0,
                "maximum": 5,
                "default": 3,
                "description": "builder_optimization_level: higher searches more tactics.",
            },
            "strongly_typed": {
                "type": "boolean",
                "default": True,
                "description": "Types come from the graph (required for FP16/INT8 from TensorRT 11 on).",
            },
            "timing_cache_mismatch": {
                "enum": ["error", "ignore"],
                "default": "error",
                "description": "A seed timing cache from another device or version.",
            },
            "detailed_profiling": {
                "type": "boolean",
                "default": True,
                "description": "ProfilingVerbosity.DETAILED, for the per-layer INT8 count.",
            },
            "tensorrt_versions": {
                "type": "string",
                "default": SUPPORTED_TENSORRT,
                "description": "PEP 440 specifier the installed TensorRT must satisfy (set by the target).",
            },
        },
    }

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        return _device_key(host)

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        with trt_logger().capture() as errors:
            return self._build(ctx, inputs, options, errors)

    def _build(
        self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any], errors: list[str]
    ) -> PassResult:
        trt = _trt()
        if not version_ok(trt.__version__, options["tensorrt_versions"]):
            raise PassError(
                f"trt_engine: TensorRT {trt.__version__} is outside the versions this target supports "
                f"({options['tensorrt_versions']})"
            )
        logger = trt_logger()
        model = inputs["model"]
        builder = trt.Builder(logger)
        flags = 0
        has_flag = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if options["strongly_typed"] and has_flag:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        # from TensorRT 11 on every network is strongly typed, with or without the flag
        strongly = (options["strongly_typed"] and has_flag) or int(trt.__version__.split(".")[0]) >= 11
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        ctx.progress("parsing ONNX")
        import onnx

        proto = onnx.load(str(model.file))
        qdq = _count_qdq(proto)
        folded = fold_int32_dequantize(proto)
        if not parser.parse(proto.SerializeToString(), str(model.file)):
            errs = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            raise PassError("trt_engine: the ONNX parser rejected the graph: " + "; ".join(errs[:5]))

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_mib"] << 20)
        config.builder_optimization_level = options["optimization_level"]
        if options["detailed_profiling"]:
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

        profile_shapes = optimization_profile(ctx.signature)
        net_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        unknown = sorted(set(net_inputs) - set(profile_shapes))
        if unknown:
            raise PassError(
                f"trt_engine: graph inputs {unknown} are not in the recipe's inputs {sorted(profile_shapes)}"
            )
        profile = builder.create_optimization_profile()
        for name in net_inputs:
            lo, opt, hi = profile_shapes[name]
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

        seed = b""
        if "timing_cache" in inputs:
            seed = inputs["timing_cache"].file.read_bytes()
        cache = config.create_timing_cache(seed)
        if not config.set_timing_cache(cache, options["timing_cache_mismatch"] == "ignore"):
            raise PassError(
                "trt_engine: TensorRT rejected the seed timing cache (built on another device or "
                "TensorRT version); set timing_cache_mismatch: ignore or drop trt_timing_cache.file"
            )

        ctx.progress("building engine")
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        build_s = time.perf_counter() - t0
        if serialized is None:
            raise PassError(
                "trt_engine: the builder returned no engine: " + "; ".join(errors[-5:] or ["no log"])
            )
        engine_path = ctx.workdir / ENGINE_FILE
        engine_path.write_bytes(bytes(serialized))
        updated = bytes(config.get_timing_cache().serialize())
        (ctx.workdir / TIMING_CACHE_FILE).write_bytes(updated)

        runtime = trt.Runtime(logger)  # must outlive the engine
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise PassError("trt_engine: the engine just built does not deserialize: " + "; ".join(errors[-5:]))
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        in_names = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        out_names = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        cuda = ctx.host.cuda or {}
        metrics = {
            "build_seconds": round(build_s, 3),
            "engine_mib": round(engine_path.stat().st_size / 2**20, 3),
            "qdq_nodes": qdq,
            "folded_int32_dequantize": folded,
            "int8_layers": _int8_layers(engine, trt) if options["detailed_profiling"] else None,
            "layers": engine.num_layers,
            "strongly_typed": bool(strongly),
            "timing_cache_bytes_in": len(seed),
            "timing_cache_bytes_out": len(updated),
            "tensorrt": trt.__version__,
            "gpu": cuda.get("name"),
            "sm": cuda.get("sm"),
        }
        meta = {
            **model.meta,
            "input_names": in_names,
            "output_names": out_names,
            "profile": {k: [list(s) for s in v] for k, v in profile_shapes.items() if k in in_names},
            "tensorrt": trt.__version__,
            "gpu": cuda.get("name"),
            "sm": cuda.get("sm"),
            "timing_cache": TIMING_CACHE_FILE,
        }
        return PassResult(ENGINE_FILE, metrics=metrics, meta=meta)


def torch_dtype(trt_dtype: Any) -> Any:
    """The ``torch.dtype`` of a ``tensorrt.DataType``.

    Raises ``PassError`` for types torch lacks (FP8, INT4...)."""
    import torch

    trt = _trt()
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int8: torch.int8,
        trt.int32: torch.int32,
        trt.bool: torch.bool,
        trt.uint8: torch.uint8,
    }
    for name, tdt in (("bfloat16", torch.bfloat16), ("int64", torch.int64)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    if trt_dtype not in table:
        raise PassError(f"TensorRT I/O type {trt_dtype} has no torch equivalent")
    return table[trt_dtype]


class TrtModule:
    """A deserialized engine and one execution context, run on CUDA tensors.

    ``forward(inputs)`` takes CUDA tensors in ``input_names`` order (already of the engine's
    input dtypes and within its optimization profile) and returns freshly allocated output
    tensors; it enqueues on the current torch stream and does not synchronise. For CUDA
    graph capture use :meth:`bind` once per static shape on a dedicated module (one
    execution context per graph), then capture :meth:`enqueue`.

    Raises ``PassError`` when CUDA is not available, the engine does not deserialize (built
    by another TensorRT version or for another GPU), or an enqueue fails.
    """

    def __init__(self, engine_path: str | Path, device: str = "cuda", engine: Any = None, runtime: Any = None):
        import torch

        if not torch.cuda.is_available():
            raise PassError("a TensorRT engine needs a CUDA device; torch sees none")
        trt = _trt()
        self.device = torch.device(device if device != "cpu" else "cuda")
        self._logger = trt_logger()
        self.runtime = runtime  # the runtime must outlive the engine
        if engine is None:
            self.runtime = trt.Runtime(self._logger)
            with self._logger.capture() as errors:
                engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if engine is None:
                raise PassError(
                    f"{engine_path}: TensorRT {trt.__version__} cannot deserialize this engine "
                    f"(built by another TensorRT version or for another GPU?): " + "; ".join(errors[-3:])
                )
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise PassError(f"{engine_path}: cannot create an execution context (out of GPU memory?)")
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in io}

    def sibling(self) -> TrtModule:
        """Another module on the same engine with its own execution context (for one more graph)."""
        return TrtModule("", self.device.type, engine=self.engine, runtime=self.runtime)

    def bind(self, inputs: list[Any]) -> list[Any]:
        """Set input shapes and addresses to ``inputs`` and allocate the outputs for those shapes;
        returns the output tensors the next :meth:`enqueue` writes."""
        import torch

        if len(inputs) != len(self.input_names):
            raise PassError(f"engine takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        for name, t in zip(self.input_names, inputs, strict=True):
            if not self.context.set_input_shape(name, tuple(t.shape)):
                lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                raise PassError(
                    f"input '{name}' shape {tuple(t.shape)} is outside the engine's profile {tuple(lo)}..{tuple(hi)}"
                )
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            o = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        return outs

    def enqueue(self, stream: Any = None) -> None:
        """Enqueue the bound execution on ``stream`` (default: torch's current stream)."""
        import torch

        s = stream or torch.cuda.current_stream(self.device)
        with self._logger.capture() as errors:
            ok = self.context.execute_async_v3(s.cuda_stream)
        if not ok:
            raise PassError("TensorRT execute_async_v3 failed: " + "; ".join(errors[-3:]))

    def forward(self, inputs: list[Any]) -> list[Any]:
        """Run once on the current stream: bind ``inputs``, enqueue, return the new outputs."""
        outs = self.bind([t.contiguous() for t in inputs])
        self.enqueue()
        return outs

    __call__ = forward


class TrtEngineRunner:
    """Runner for ``trt.engine`` artifacts: numpy feeds in, float32 numpy outputs, through
    :class:`TrtModule` on CUDA. Inputs are cast to the engine's input dtypes; the call
    synchronises before returning (host copies included, as the other runners)."""

    def __init__(self, artifact: Artifact, device: str = "cuda", threads: int | None = None):
        if device == "cpu":
            log.debug("trt.engine artifacts run on CUDA; device='cpu' is ignored")
        self.module = TrtModule(artifact.file, "cuda")
        self.input_names = list(self.module.input_names)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        m = self.module
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(m.device).to(m.dtypes[n]) for n in m.input_names]
        with torch.no_grad():
            outs = m.forward(args)
        torch.cuda.current_stream(m.device).synchronize()
        return [o.float().cpu().numpy() for o in outs]
