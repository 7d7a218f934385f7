"""Every hook accelc calls, in one module (after ``_pytest/hookspec.py`` and ``datasette/hookspecs.py``).

A plugin is a module (or object) with ``@hookimpl`` functions named after these specs; it
implements any subset. accelc's own passes, targets, runtimes, artifact kinds, host
capabilities and sources are registered by built-in plugins (:mod:`accelc.plugins.generic`,
:mod:`accelc.plugins.onnxruntime`, :mod:`accelc.plugins.openvino`,
:mod:`accelc.plugins.tensorrt`, :mod:`accelc.plugins.torch`, :mod:`accelc.plugins.transformers`,
:mod:`accelc.plugins.targets`)
through these same hooks, so there is no second path for "our own".

The ``accelc_register_*`` hooks are called once per process, when the registry is built
(the first command that needs it), each implementation separately, so a plugin whose hook
raises or returns the wrong thing is named in the error. Names must be unique across
plugins; a clash names both. A plugin module implementing a function that starts with
``accelc_`` but matches no spec here is refused at start-up (``check_pending``), naming it.

Third-party plugins declare an entry point in the group ``accelc.plugins``::

    [project.entry-points."accelc.plugins"]
    example = "accelc_example_plugin"

``ACCELC_PLUGINS=a,b`` loads only those installed plugins (by entry-point name);
``ACCELC_DISABLE_PLUGINS=a,b`` skips them (built-in plugins included, by module name).
``accelc plugins`` lists what is loaded, with each plugin's hooks and version.

Example plugin module::

    from accelc.plugins import hookimpl
    from accelc.pass_api import Pass, PassResult, Slot

    class Strip(Pass):
        name = "strip_doc"
        inputs = (Slot("model", ("onnx",)),)
        produces = "onnx"
        def run(self, ctx, inputs, options): ...

    @hookimpl
    def accelc_register_passes():
        return [Strip]
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("accelc")
hookimpl = pluggy.HookimplMarker("accelc")


@hookspec
def accelc_register_passes() -> list[Any]:
    """Register passes.

    Called once, when the registry is built.

    :return: pass classes (or instances) deriving from :class:`accelc.pass_api.Pass`. Each
        must have a ``name`` and a ``produces`` string and a valid JSON Schema (2020-12) as
        ``options_schema``; a pass that needs settings from the rest of the recipe implements
        :meth:`accelc.pass_api.Pass.configure`.

    .. versionadded:: 0.1.0
    """


@hookspec
def accelc_register_targets() -> list[Any]:
    """Register deployment targets.

    Called once, when the registry is built.

    :return: :class:`accelc.targets.TargetProfile` objects: the device, the capabilities a
        build for it needs, and per runtime and precision the default pipeline. Each runtime a
        target names should be registered (``accelc_register_runtimes``) by some plugin.

    .. versionadded:: 0.1.0
    """


@hookspec
def accelc_register_runtimes() -> list[Any]:
    """Register runtimes: what executes artifacts for ``verify``/``benchmark`` and trials for
    the accuracy searches.

    Called once, when the registry is built.

    :return: :class:`accelc.runners.Runtime` objects. ``runner(artifact, device=, threads=)``
        runs the artifact kinds in ``kinds`` (``verify``, ``benchmark`` and ``reference`` pick
        runners by kind); ``session(model, threads=)``, when set, runs an ONNX file or its
        bytes, and is what calibrate's method search, quantize's sensitivity and fallback
        search and bias correction use when the recipe names this runtime; ``pass_defaults``
        are pass options the runtime wants unless the recipe sets them; ``predictor(out_dir,
        deploy, device=, threads=)`` is how :func:`accelc.runtime.load` runs a build's deployed
        artifact of one of ``kinds`` (``accelc.runners.runner_predictor(runner)`` makes one from
        the runner); ``config_file`` and ``load`` open an out dir without ``deploy.json``.

    .. versionadded:: 0.2.0
    """


@hookspec
def accelc_register_runners() -> dict[str, Any]:
    """Register runners for artifact kinds without declaring a runtime.

    Called once, when the registry is built. Prefer ``accelc_register_runtimes``, which also
    gives trials a session factory.

    :return: ``{artifact kind: factory}``; ``factory(artifact, device=..., threads=...)``
        returns a :class:`accelc.runners.Runner` that executes that kind on numpy inputs.

    .. versionadded:: 0.1.0
    """


@hookspec
def accelc_register_artifact_kinds() -> list[Any]:
    """Register artifact kinds.

    Called once, when the registry is built.

    :return: :class:`accelc.artifacts.ArtifactKind` objects: the name, a ``check(path)`` of
        the primary file (run on every pass output before it is committed; it must not
        execute or unpickle anything), whether the kind is ``runnable`` (``verify`` and
        ``benchmark`` accept it; it can be the deployed artifact), whether it is
        ``device_bound`` (run on the target's GPU on a CUDA target), and the host
        capabilities executing it ``requires``. A pass may only produce a registered kind.

    .. versionadded:: 0.2.0
    """


@hookspec
def accelc_register_host_capabilities() -> dict[str, Any]:
    """Register host capability probes.

    Called once, when the registry is built.

    :return: ``{name: probe}``; ``probe(host, op, value) -> (ok, detail)`` answers the
        capability ``name`` (as passes, kinds and targets write it: ``name`` or
        ``name>=75``; ``op``/``value`` are ``None`` for a bare name). ``host`` is the
        :class:`accelc.host.Host` (``host.fact(name, compute)`` caches a probed fact and
        honours a test's overrides); ``detail`` says what was found, for the plan's
        "cannot run here, because" line. Probes should be cheap and import nothing heavy
        unless the plan asks for them.

    .. versionadded:: 0.2.0
    """


@hookspec
def accelc_register_model_sources() -> list[Any]:
    """Register model sources.

    Called once, when the registry is built.

    :return: :class:`accelc.sources.ModelSource` objects (``model.source`` in a recipe picks
        one by name; the other keys of ``model`` are its options).

    .. versionadded:: 0.1.0
    """


@hookspec
def accelc_register_data_sources() -> list[Any]:
    """Register data sources.

    Called once, when the registry is built.

    :return: :class:`accelc.sources.DataSource` objects (``data.*.source`` picks one by name).

    .. versionadded:: 0.1.0
    """


@hookspec
def accelc_report_sections(report: dict[str, Any], stages: list[Any]) -> dict[str, Any] | None:
    """Add sections to a build's report.

    Called once per build (also a failed one), after the report is assembled and before it
    is written to ``report.json``.

    :param report: the report so far (JSON-ready; do not modify it).
    :param stages: the :class:`accelc.executor.Stage` records of the build, in order.
    :return: ``{section name: JSON-ready value}``, or ``None`` for nothing. Sections are
        stored under ``report["sections"]``; a name another plugin returned is an error.

    .. versionadded:: 0.2.0
    """
