"""``openvino_ir``: an ONNX model (float or QDQ) converted to OpenVINO IR for the CPU plugin.

OpenVINO reads the QDQ graph that ``quantize`` writes as it is: its low-precision
transformations turn each ``DequantizeLinear -> Conv`` with a quantized output into one INT8
convolution (VNNI ``vpdpbusd`` kernels on AVX-512 VNNI CPUs, the oneDNN ``brgconv`` family),
so the calibration, bias correction and float fallback chosen upstream carry over unchanged
(OpenVINO documentation, "Low Precision Transformations" and "Quantized models compute and
restrictions"). The conversion is ``openvino.convert_model`` then ``openvino.save_model``
with ``compress_to_fp16=False``: the default would round every float weight, including those
of the nodes kept in float, to FP16.

Why a second CPU runtime: on EfficientNet-Lite0 (2 threads, batch 1) the same INT8 QDQ file
runs with much less per-operator overhead in OpenVINO than in ONNX Runtime; see
``benchmarks/README.md`` for the side-by-side numbers.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import PassError
from accelc.pass_api import Pass, PassContext, PassResult, Slot

#: ``INFERENCE_PRECISION_HINT`` values accelc passes to OpenVINO's CPU plugin. ``f32`` keeps every
#: float op in float32; without a hint the plugin runs float ops in bf16 on CPUs that have it
#: (AVX512-BF16, AMX), which moves outputs by about 1e-2 relative.
OPENVINO_PRECISIONS = ("f32", "bf16", "f16")


def _openvino() -> Any:
    """The ``openvino`` module. Raises :class:`PassError` saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise PassError("the openvino runtime needs the Python package 'openvino' (pip install openvino)") from e
    return openvino


@functools.cache
def _openvino_core() -> Any:
    """One ``openvino.Core`` for the process, never destroyed. OpenVINO 2026.4's CPU plugin calls
    ``sigaltstack`` on the calling thread when its engine is created and when compiled models
    are destroyed (seen in gdb); with a Core per model, two models released first-in first-out
    left the main thread's alternate signal stack on freed memory. Python's signal
    handlers run on that stack (SA_ONSTACK), so a later Ctrl-C segfaulted instead of raising
    KeyboardInterrupt (tests/test_openvino.py::test_ctrl_c_still_raises_keyboard_interrupt_after_openvino_ran)."""
    return _openvino().Core()


def _first_line(e: BaseException) -> str:
    """An OpenVINO error's message on one line, without the C++ source locations its lines start
    with (``Exception from src/...cpp:27:``, ``Check 'false' failed at src/...cpp:47:``), which say
    nothing to a user: ``Loading input model: Input tensor isn't found for node "x"``."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    told = [ln for ln in lines if not re.search(r"\.(cpp|hpp|h):\d+:?$", ln)]
    return ": ".join(told or lines or [type(e).__name__])[:400]


def openvino_compile(model: Any, threads: int | None = None, precision: str = "f32") -> Any:
    """An OpenVINO ``CompiledModel`` on the CPU plugin, set up for batch-1 latency.

    ``model``: a path (``.xml`` IR or ``.onnx``) or an ``openvino.Model``. ``threads`` sets
    ``INFERENCE_NUM_THREADS`` (``None``: the plugin's default, one per physical core);
    ``PERFORMANCE_HINT=LATENCY`` gives one inference stream; ``precision`` is the
    ``INFERENCE_PRECISION_HINT`` (:data:`OPENVINO_PRECISIONS`). Raises :class:`PassError` when
    the ``openvino`` package is missing or the plugin cannot compile the model.
    """
    core = _openvino_core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    src = str(model) if isinstance(model, (str, os.PathLike)) else model
    try:
        return core.compile_model(src, "CPU", config)
    except RuntimeError as e:
        what = src if isinstance(src, str) else "the model"
        raise PassError(f"OpenVINO could not compile {what}: {_first_line(e)}") from e


def openvino_convert(path: str | os.PathLike[str] | bytes) -> Any:
    """An ONNX file as an ``openvino.Model`` through ``openvino.convert_model``: the graph the
    ``openvino_ir`` pass saves. Compiling the ONNX file directly takes another route through the
    frontend, whose float rounding can differ (on EfficientNet-Lite0 INT8 it flipped one near-tie
    crop of 96), so whatever scores a model for OpenVINO converts it this way first.
    Raises :class:`PassError` naming the file when the conversion fails."""
    ov = _openvino()
    try:
        return ov.convert_model(io.BytesIO(path) if isinstance(path, bytes) else str(path))
    except Exception as e:  # the ONNX frontend raises its own OpConversionFailure / RuntimeError types
        what = "the in-memory ONNX model" if isinstance(path, bytes) else Path(path).name
        raise PassError(f"OpenVINO could not convert {what}: {_first_line(e)}") from e


class OpenVinoSession:
    """One infer request of a compiled model; ``run(feeds)`` copies the outputs out of the
    request's buffers (the next call reuses them)."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in compiled.inputs]
        self.input_shapes = [
            [d.get_length() if d.is_static else None for d in p.get_partial_shape()] for p in compiled.inputs
        ]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return [np.array(self.request.get_output_tensor(i).data) for i in range(len(self.compiled.outputs))]



class OpenVinoRunner:
    """Runs an ``openvino.ir`` artifact (``model.xml`` + ``model.bin``) on OpenVINO's CPU plugin
    with :func:`openvino_compile`, at the inference precision recorded in its metadata."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None):
        if device != "cpu":
            raise PassError(f"an openvino.ir artifact runs on the CPU plugin, not on '{device}'")
        precision = artifact.meta.get("inference_precision", "f32")
        self.session = OpenVinoSession(openvino_compile(artifact.file, threads, precision))
        self.input_names = self.session.input_names

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(feeds)



def openvino_trial_session(model: str | os.PathLike[str] | bytes, threads: int | None = None) -> OpenVinoSession:
    """The ``openvino`` runtime's session factory: an ONNX file (or its bytes) through
    :func:`openvino_convert` then :func:`openvino_compile` with float ops kept in f32, exactly what
    an ``openvino_ir`` artifact runs, so trials are scored on the runtime that deploys them."""
    return OpenVinoSession(openvino_compile(openvino_convert(model), threads, "f32"))


#: Layer types of OpenVINO's CPU runtime model that carry the compute (GroupConvolution is
#: reported as Convolution there).
COMPUTE_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "FullyConnectedQuantizedLegacy", "MatMul")


def layer_precisions(compiled: Any) -> dict[str, int]:
    """How the CPU plugin runs the compute layers of a compiled model: ``{precision: count}``
    from the runtime model's ``runtimePrecision`` (``u8``/``i8``: an INT8 kernel, ``f32``,
    ``bf16``), over :data:`COMPUTE_LAYERS`."""
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in COMPUTE_LAYERS:
            counts[info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"] += 1
    return dict(sorted(counts.items()))


class OpenVinoIR(Pass):
    """Convert the ONNX model (float or QDQ) to OpenVINO IR (``model.xml`` + ``model.bin``).

    The pass compiles the IR once on this host's CPU plugin to prove that it loads, and reports
    how its compute layers run (``layers``: ``{"u8": 47, "f32": 3}`` means 47 INT8 kernels and
    3 float ones): a QDQ pattern the plugin cannot fuse shows up as a float layer here.
    ``inference_precision`` is recorded with the artifact and used by its runner as the CPU
    plugin's ``INFERENCE_PRECISION_HINT``: ``f32`` (default) keeps float ops in float32, as
    verified upstream; ``bf16`` runs them in bfloat16 where the CPU has it (faster float
    layers, about 1e-2 relative error; verify measures it).

    Raises:
        PassError: ``openvino`` is not installed, or the model does not convert or compile
            (the message names OpenVINO's first line of the reason).
    """

    name = "openvino_ir"
    version = "1"
    inputs = (Slot("model", ("onnx", "onnx.qdq")),)
    produces = "openvino.ir"
    requires = ("openvino",)
    env_packages = ("openvino",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "inference_precision": {
                "enum": list(OPENVINO_PRECISIONS),
                "default": "f32",
                "description": "The CPU plugin's INFERENCE_PRECISION_HINT for float ops: f32 keeps them in "
                "float32; bf16/f16 run them in 16 bits where the CPU supports it.",
            },
        },
    }

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        """The IR itself is host-independent, but the layer report comes from this CPU's plugin."""
        return {"cpu": host.cpu_model}

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import openvino as ov

        ctx.progress("convert to OpenVINO IR")
        try:
            model = openvino_convert(inputs["model"].file)
        except PassError as e:
            raise PassError(f"openvino_ir: {e}") from e
        xml = ctx.workdir / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        ctx.progress("compile on the CPU plugin")
        compiled = openvino_compile(xml, threads=None, precision=options["inference_precision"])
        meta = {
            **inputs["model"].meta,
            "inference_precision": options["inference_precision"],
            "source_kind": inputs["model"].kind,
        }
        metrics = {
            "openvino": ov.__version__.split("-")[0],
            "inference_precision": options["inference_precision"],
            "layers": layer_precisions(compiled),
            "inputs": {p.get_any_name(): str(p.get_partial_shape()) for p in model.inputs},
        }
        return PassResult("model.xml", metrics=metrics, meta=meta)
