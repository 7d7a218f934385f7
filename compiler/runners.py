"""Runners and sessions as protocols, and the factory that finds them through the registry.

A **runner** executes one runnable artifact on numpy inputs (``verify``, ``benchmark`` and
``reference`` use them), so every stage is verified and benchmarked the same way. A
**session** runs an ONNX file (or its bytes) for trials: calibrate's method search,
quantize's sensitivity analysis and fallback search, and bias correction. Both come from a
:class:`Runtime`, which a plugin registers through ``accelc_register_runtimes``; the core
names no runtime and imports none.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .artifacts import Artifact
from .errors import PassError


class Runner(Protocol):
    """Executes one artifact. ``input_names`` in model order; ``run`` returns host float arrays."""

    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Session(Protocol):
    """An ONNX model loaded for trials. ``input_names`` in model order; ``input_shapes`` one list per
    input, each axis an int (static) or anything else (dynamic: ``None`` or the axis name);
    ``run(feeds)`` returns every output as a host array, in model order."""

    input_names: list[str]
    input_shapes: list[list[Any]]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


#: ``runner(artifact, device="cpu" | "cuda", threads=int | None) -> Runner``
RunnerFactoryFn = Callable[..., Runner]
#: ``session(model: path | bytes, threads=int | None) -> Session``
SessionFactoryFn = Callable[..., Session]


@dataclass(frozen=True)
class Runtime:
    """A runtime a target deploys with (``recipe.runtime``), registered by a plugin.

    Attributes:
        name: the name recipes and targets use (``onnxruntime``, ``openvino``, ``tensorrt``).
        description: one line for ``accelc plugins``.
        kinds: artifact kinds :attr:`runner` executes (``verify``/``benchmark`` pick the runner by kind).
        runner: ``runner(artifact, device=..., threads=...)`` -> :class:`Runner`; ``None``: runs no artifact.
        session: ``session(model, threads=...)`` -> :class:`Session` for an ONNX file (path or
            bytes); ``None`` when the runtime does not run ONNX files itself (trials then run on
            ``onnxruntime``, e.g. a TensorRT build scores its QDQ graph there).
        pass_defaults: ``{pass name: options}`` the runtime wants unless the recipe sets them
            (OpenVINO: ``{"quantize": {"float_node_inputs": "float"}}``); lowering applies them.
        config_file: a file name that marks a build's out dir as this runtime's to load
            (``runtime.json``); :func:`accelc.runtime.load` picks the runtime by it.
        load: ``load(out_dir, **options)`` -> the loaded, callable runtime (a predictor) for an
            out dir that holds :attr:`config_file` but no ``deploy.json`` (older GPU builds).
        predictor: ``predictor(out_dir, deploy, device=..., threads=...)`` -> :class:`Runner` over the
            deployed artifact of a build's out dir (``deploy``: its ``deploy.json``, a dict);
            :func:`accelc.runtime.load` wraps it in :class:`accelc.runtime.Predictor`. Make one
            from a runner factory with :func:`runner_predictor`.
    """

    name: str
    description: str = ""
    kinds: tuple[str, ...] = ()
    runner: RunnerFactoryFn | None = None
    session: SessionFactoryFn | None = None
    pass_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    config_file: str = ""
    load: Callable[..., Any] | None = None
    predictor: Callable[..., Runner] | None = None


def runner_predictor(factory: RunnerFactoryFn) -> Callable[..., Runner]:
    """A :attr:`Runtime.predictor` from a runner factory: the out dir's deployed files opened as the
    :class:`Artifact` the build verified (kind, primary file and pass metadata from ``deploy.json``),
    run by ``factory(artifact, device=..., threads=...)``."""

    def predictor(
        out_dir: Path, deploy: dict[str, Any], device: str | None = None, threads: int | None = None
    ) -> Runner:
        meta = deploy.get("meta") or {}
        art = Artifact(deploy["kind"], Path(out_dir), deploy["artifact"], deploy.get("digest") or "", meta)
        return factory(art, device=device or deploy.get("device", "cpu"), threads=threads)

    return predictor


#: The runtime trials fall back to when the recipe's runtime has no session factory.
DEFAULT_TRIAL_RUNTIME = "onnxruntime"


class RunnerFactory:
    """``make(artifact)`` with the runner registered for the artifact's kind, ``session(model,
    runtime=...)`` with the runtime's session factory.

    Args:
        factories: ``{artifact kind: runner factory}`` (the registry's ``runners``).
        runtimes: ``{name: Runtime}`` (the registry's ``runtimes``); needed by :meth:`session` only.
    """

    def __init__(self, factories: dict[str, Any], runtimes: dict[str, Runtime] | None = None):
        self.factories = factories
        self.runtimes = runtimes or {}

    def make(self, artifact: Artifact, device: str = "cpu", threads: int | None = None) -> Runner:
        """A runner for ``artifact``. Raises :class:`PassError` when no plugin runs its kind."""
        f = self.factories.get(artifact.kind)
        if f is None:
            raise PassError(
                f"no runner for artifact kind '{artifact.kind}' (runners: {', '.join(self.factories)})"
            )
        return f(artifact, device=device, threads=threads)

    def session(
        self, model: str | os.PathLike[str] | bytes, threads: int | None = None, runtime: str = DEFAULT_TRIAL_RUNTIME
    ) -> Session:
        """A trial session for the ONNX ``model`` (path or serialized bytes) on ``runtime``.

        Raises :class:`PassError` naming the runtimes that have a session factory when
        ``runtime`` is unknown or has none."""
        rt = self.runtimes.get(runtime)
        if rt is None or rt.session is None:
            have = ", ".join(sorted(n for n, r in self.runtimes.items() if r.session is not None)) or "none"
            raise PassError(f"runtime '{runtime}' runs no ONNX trial sessions (runtimes that do: {have})")
        return rt.session(model, threads=threads)


def trial_runtime(runtimes: dict[str, Runtime], runtime: str) -> str:
    """The runtime that runs trials for a build on ``runtime``: itself when it has a session
    factory, else :data:`DEFAULT_TRIAL_RUNTIME`."""
    rt = runtimes.get(runtime)
    return runtime if rt is not None and rt.session is not None else DEFAULT_TRIAL_RUNTIME


def flatten_outputs(out: Any) -> list[Any]:
    """A model's outputs as a flat list: nested tuples/lists in order, dicts by sorted key."""
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten_outputs(out[k])]
    return [out]


@contextlib.contextmanager
def scoped_sys_path(paths: list[str] | tuple[str, ...] | str | None) -> Iterator[None]:
    """Put ``paths`` (folders holding a user's model code) at the front of ``sys.path`` for the
    block, then take out exactly the entries this call added (so unpickling a ``torch.module``
    finds its classes, and the process's import path is left as it was)."""
    if isinstance(paths, str):
        paths = [paths]
    added = [p for p in (paths or []) if p and p not in sys.path]
    for p in reversed(added):
        sys.path.insert(0, p)
    try:
        yield
    finally:
        for p in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)


def default_threads() -> int:
    """Threads used when a recipe sets none: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1
