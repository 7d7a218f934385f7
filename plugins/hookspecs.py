"""Every hook accelc calls, in one module (after ``_pytest/hookspec.py`` and ``datasette/hookspecs.py``).

A plugin implements any subset of these with ``@hookimpl``. Each hook is called
once per process when the registry is built; its return value is collected from
every plugin. The built-in passes, targets and sources register through these same
hooks (:mod:`accelc.plugins.builtin`), so there is no second path for "our own".

Example plugin module, exposed through ``[project.entry-points."accelc.plugins"]``::

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
    """Return pass classes (subclasses of :class:`accelc.pass_api.Pass`) this plugin provides.

    Called once when the registry is built. Pass names must be unique across plugins;
    a clash is reported naming both plugins.
    """


@hookspec
def accelc_register_targets() -> list[Any]:
    """Return :class:`accelc.targets.TargetProfile` objects this plugin provides."""


@hookspec
def accelc_register_model_sources() -> list[Any]:
    """Return :class:`accelc.sources.ModelSource` objects (``model.source`` in a recipe picks one by name)."""


@hookspec
def accelc_register_data_sources() -> list[Any]:
    """Return :class:`accelc.sources.DataSource` objects (``data.*.source`` picks one by name)."""


@hookspec
def accelc_register_runners() -> dict[str, Any]:
    """Return ``{artifact kind: factory}``; ``factory(artifact, device=..., threads=...)`` returns a
    :class:`accelc.runners.Runner` that executes that kind on numpy inputs."""
