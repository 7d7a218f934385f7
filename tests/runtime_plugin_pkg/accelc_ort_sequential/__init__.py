"""An accelc plugin in its own package: the ``cpu-seq`` target with the ``ort-sequential`` runtime.

* runtime ``ort-sequential``: ONNX Runtime with ``ExecutionMode.ORT_SEQUENTIAL``, one intra-op
  thread, no thread spinning and basic graph optimizations only; its runner executes the
  ``onnx.ort_basic`` kind, and its session factory runs the trials of ``calibrate: auto``,
  ``quantize: fallback`` and bias correction on the same configuration;
* kind ``onnx.ort_basic``: an ONNX file already optimized at ``ORT_ENABLE_BASIC`` (checked with
  ``onnx.checker``);
* pass ``ort_basic_optimize``: writes that file (``SessionOptions.optimized_model_filepath``);
* capability ``ort_sequential``: the installed ONNX Runtime has the sequential execution mode;
* target ``cpu-seq``: fp32 and int8 pipelines ending in ``ort_basic_optimize``.

Everything goes through accelc's public hooks; accelc's code is not changed for it.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from accelc.artifacts import ArtifactKind
from accelc.pass_api import Pass, PassResult, Slot
from accelc.plugins import hookimpl
from accelc.runners import Runtime
from accelc.targets import Pipeline, TargetProfile

KIND = "onnx.ort_basic"
RUNTIME = "ort-sequential"


def _options(threads=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class SequentialSession:
    """An ``accelc.runners.Session`` (and ``Runner``) on the sequential configuration."""

    def __init__(self, model, threads=None):
        import onnxruntime as ort

        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, _options(threads), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_shapes = [list(i.shape) for i in self.session.get_inputs()]

    def run(self, feeds):
        return [np.asarray(o) for o in self.session.run(None, feeds)]


def runner(artifact, device="cpu", threads=None):
    return SequentialSession(artifact.file, threads)


def session(model, threads=None):
    return SequentialSession(model, threads)


def onnx_problem(path):
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        return f"fails onnx.checker: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    return None


class OrtBasicOptimize(Pass):
    """Write the ONNX graph as ONNX Runtime optimizes it at ORT_ENABLE_BASIC (constant folding,
    redundant-node elimination), the file the ``ort-sequential`` runtime deploys."""

    name = "ort_basic_optimize"
    version = "1"
    inputs = (Slot("model", ("onnx", "onnx.qdq")),)
    produces = KIND
    requires = ("ort_sequential",)
    env_packages = ("onnxruntime", "onnx")
    options_schema = {"type": "object", "additionalProperties": False, "properties": {}}

    def run(self, ctx, inputs, options):
        import onnx
        import onnxruntime as ort

        out = ctx.workdir / "model.onnx"
        so = _options()
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(inputs["model"].file), so, providers=["CPUExecutionProvider"])
        nodes = len(onnx.load(str(out)).graph.node)
        return PassResult("model.onnx", metrics={"nodes": nodes}, meta=inputs["model"].meta)


def _has_sequential(host, op, value):
    if importlib.util.find_spec("onnxruntime") is None:
        return False, "package onnxruntime not installed"
    import onnxruntime as ort

    ok = hasattr(ort, "ExecutionMode") and hasattr(ort.ExecutionMode, "ORT_SEQUENTIAL")
    return ok, f"onnxruntime {ort.__version__}"


CPU_SEQ = TargetProfile(
    name="cpu-seq",
    description="x86-64 CPU, ONNX Runtime sequential (one thread, no spinning, basic optimizations)",
    device="cpu",
    capabilities=("ort_sequential",),
    default_runtime=RUNTIME,
    runtimes={
        RUNTIME: {
            "fp32": Pipeline.of("export_onnx", "onnxsim", "ort_basic_optimize", verify_after=("ort_basic_optimize",)),
            "int8": Pipeline.of(
                "export_onnx",
                "onnxsim",
                "calibrate",
                "quantize",
                "ort_basic_optimize",
                verify_after=("ort_basic_optimize",),
            ),
        }
    },
)


@hookimpl
def accelc_register_passes():
    return [OrtBasicOptimize]


@hookimpl
def accelc_register_targets():
    return [CPU_SEQ]


@hookimpl
def accelc_register_runtimes():
    return [Runtime(RUNTIME, "ONNX Runtime, sequential, 1 thread", kinds=(KIND,), runner=runner, session=session)]


@hookimpl
def accelc_register_artifact_kinds():
    return [ArtifactKind(KIND, "model.onnx optimized at ORT_ENABLE_BASIC", onnx_problem, runnable=True)]


@hookimpl
def accelc_register_host_capabilities():
    return {"ort_sequential": _has_sequential}
