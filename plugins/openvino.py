"""Built-in plugin ``accelc.plugins.openvino``: OpenVINO's CPU plugin as a runtime.

The ``openvino_ir`` pass, the ``openvino.ir`` kind, the ``openvino`` runtime (runner for IR
artifacts, trial sessions that convert an ONNX file exactly as ``openvino_ir`` does) and the
``openvino`` host capability. Nothing here imports ``openvino`` until a model is run.
"""

from __future__ import annotations

from typing import Any

from accelc.artifacts import ArtifactKind
from accelc.host import package_probe
from accelc.passes.openvino import OpenVinoIR, OpenVinoRunner, openvino_trial_session
from accelc.runners import Runtime, runner_predictor

from .hookspecs import hookimpl


@hookimpl
def accelc_register_passes() -> list[Any]:
    return [OpenVinoIR]


@hookimpl
def accelc_register_artifact_kinds() -> list[Any]:
    return [
        ArtifactKind(
            "openvino.ir", "model.xml + model.bin: OpenVINO IR", None, runnable=True, requires=("openvino",)
        )
    ]


@hookimpl
def accelc_register_runtimes() -> list[Any]:
    # OpenVINO runs the producer of a float node's input as an INT8 kernel with a float output when
    # no Q/DQ pair sits in between (see the quantize option ``float_node_inputs``).
    return [
        Runtime(
            "openvino",
            "OpenVINO CPU plugin (reads ONNX and IR)",
            kinds=("openvino.ir",),
            runner=OpenVinoRunner,
            predictor=runner_predictor(OpenVinoRunner),
            session=openvino_trial_session,
            pass_defaults={"quantize": {"float_node_inputs": "float"}},
        )
    ]


@hookimpl
def accelc_register_host_capabilities() -> dict[str, Any]:
    return {"openvino": package_probe("openvino")}
