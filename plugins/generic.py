"""Built-in plugin ``accelc.plugins.generic``: what no runtime owns. The loading passes
(``load_model``, ``load_data``, ``reference``), ``verify`` and ``benchmark``, the model and data
sources, the data and report artifact kinds, and the CPU host capabilities. Registered through
the same hooks as any third-party plugin."""

from __future__ import annotations

from typing import Any

from accelc.artifacts import ArtifactKind, json_problem, npz_problem
from accelc.host import cpu_probes
from accelc.passes.benchmark import Benchmark
from accelc.passes.loading import LoadData, LoadModel, Reference
from accelc.passes.verification import Verify
from accelc.sources.data import ImagesSource, TensorsSource
from accelc.sources.models import PythonSource, TorchvisionSource

from .hookspecs import hookimpl


@hookimpl
def accelc_register_passes() -> list[Any]:
    return [LoadModel, LoadData, Reference, Verify, Benchmark]


@hookimpl
def accelc_register_model_sources() -> list[Any]:
    return [TorchvisionSource, PythonSource]


@hookimpl
def accelc_register_data_sources() -> list[Any]:
    return [ImagesSource, TensorsSource]


@hookimpl
def accelc_register_artifact_kinds() -> list[Any]:
    return [
        ArtifactKind(
            "calibration.data",
            "data.npz: preprocessed calibration inputs",
            npz_problem,
            missing_hint=" (add data.calibration to the recipe)",
        ),
        ArtifactKind(
            "validation.data",
            "data.npz: preprocessed validation inputs (+ optional labels)",
            npz_problem,
            missing_hint=" (add data.validation to the recipe)",
        ),
        ArtifactKind(
            "reference.outputs",
            "outputs.npz: source-model outputs on the validation inputs",
            npz_problem,
            missing_hint=" (add data.validation to the recipe)",
        ),
        ArtifactKind("verification.report", "metrics.json", json_problem),
        ArtifactKind("benchmark.report", "metrics.json", json_problem),
    ]


@hookimpl
def accelc_register_host_capabilities() -> dict[str, Any]:
    return cpu_probes()
