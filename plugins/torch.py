"""Built-in plugin ``accelc.plugins.torch``: PyTorch artifacts and CUDA graphs.

Passes ``fuse_modules``, ``to_half``, ``trace``, ``script``, ``export`` and ``cuda_graph``; the
kinds ``torch.module``, ``torchscript``, ``torch.exported`` and ``runtime.config``; the ``torch``
runtime (eager PyTorch) and the ``cuda_graph`` runtime (replays captured CUDA graphs; what
:func:`accelc.runtime.load` opens from a GPU build's out dir); the ``cuda`` and ``sm`` host
capabilities. torch itself is imported only when a model is built or run.
"""

from __future__ import annotations

from typing import Any

from accelc.artifacts import ArtifactKind, json_problem, zip_problem
from accelc.host import cuda_probes
from accelc.passes.cuda_graph import CudaGraph
from accelc.passes.cuda_graph_runtime import CONFIG_NAME, RuntimeConfigRunner, load
from accelc.passes.fusion import FuseModules
from accelc.passes.torch_runtime import Export, Script, ToHalf, TorchRunner, Trace
from accelc.runners import Runtime, runner_predictor

from .hookspecs import hookimpl

_TORCH_ZIP = zip_problem("torch zip archive (torch.save / torch.jit.save / torch.export.save)")


@hookimpl
def accelc_register_passes() -> list[Any]:
    return [FuseModules, ToHalf, Trace, Script, Export, CudaGraph]


@hookimpl
def accelc_register_artifact_kinds() -> list[Any]:
    return [
        ArtifactKind(
            "torch.module", "model.pt: torch.save of an nn.Module in eval mode", _TORCH_ZIP, runnable=True,
            device_bound=True,
        ),
        ArtifactKind("torchscript", "model.ts", _TORCH_ZIP, runnable=True, device_bound=True),
        ArtifactKind("torch.exported", "model.pt2", _TORCH_ZIP, runnable=True, device_bound=True),
        ArtifactKind(
            "runtime.config",
            "runtime.json: how the loader rebuilds the runtime (CUDA graphs over a model file)",
            json_problem,
            runnable=True,
            device_bound=True,
            requires=("cuda",),
        ),
    ]


@hookimpl
def accelc_register_runtimes() -> list[Any]:
    return [
        Runtime(
            "torch",
            "eager PyTorch (torch.module, TorchScript, torch.export) on CPU or CUDA",
            kinds=("torch.module", "torchscript", "torch.exported"),
            runner=TorchRunner,
            predictor=runner_predictor(TorchRunner),
        ),
        Runtime(
            "cuda_graph",
            "CUDA graphs captured at load time over a TensorRT engine or a torch artifact (runtime.json)",
            kinds=("runtime.config",),
            runner=RuntimeConfigRunner,
            predictor=runner_predictor(RuntimeConfigRunner),
            config_file=CONFIG_NAME,
            load=load,
        ),
    ]


@hookimpl
def accelc_register_host_capabilities() -> dict[str, Any]:
    return cuda_probes()
