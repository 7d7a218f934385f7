"""Target profiles: what the hardware is and how to build for it.

A target lists the runtimes it supports and, for each runtime and precision, a
default pipeline (ordered pass steps) with the points where verification runs.
Targets register through the ``accelc_register_targets`` hook, so a new target is
a plugin, not a fork.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PassStep:
    """One pipeline entry: a pass name and its options (validated against the pass's schema)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pipeline:
    """Ordered steps, and the step names after which ``verify`` runs by default.

    ``when_verified`` holds ``{pass name: options}`` added to the steps only when the build verifies
    with tolerances (the recipe has ``data.validation``, verification on and tolerances set): the
    accuracy-aware searches need the validation set and a tolerance to aim for, and a build without
    them gets the plain steps instead of an error."""

    steps: tuple[PassStep, ...]
    verify_after: tuple[str, ...] = ()
    when_verified: tuple[PassStep, ...] = ()

    @classmethod
    def of(
        cls,
        *steps: str | tuple[str, dict[str, Any]],
        verify_after: tuple[str, ...] = (),
        when_verified: dict[str, dict[str, Any]] | None = None,
    ) -> Pipeline:
        """Shorthand: ``Pipeline.of("export_onnx", ("quantize", {"per_channel": True}))``."""
        out = []
        for s in steps:
            out.append(PassStep(s) if isinstance(s, str) else PassStep(s[0], dict(s[1])))
        extra = tuple(PassStep(k, dict(v)) for k, v in (when_verified or {}).items())
        return cls(tuple(out), verify_after, extra)

    def steps_for(self, verified: bool) -> list[PassStep]:
        """The steps, with :attr:`when_verified`'s options merged in (under each step's own) if ``verified``."""
        if not verified or not self.when_verified:
            return list(self.steps)
        extra = {s.name: s.options for s in self.when_verified}
        return [PassStep(s.name, {**extra.get(s.name, {}), **s.options}) for s in self.steps]


@dataclass(frozen=True)
class TargetProfile:
    """A deployment target.

    Attributes:
        name: registry name (``cpu``, ``t4``).
        description: one line for ``accelc targets``.
        device: ``cpu`` or ``cuda`` (where runners execute artifacts).
        capabilities: host capabilities building for this target needs beyond each pass's own
            (e.g. ``sm>=75`` for a T4 profile), in the syntax of :mod:`accelc.host`.
        compute_capability: CUDA ``(major, minor)`` for GPU targets, ``None`` for CPU.
        runtimes: ``{runtime: {precision: Pipeline}}``.
        default_runtime: the runtime used when the recipe names none.
        execution_provider: ONNX Runtime execution provider used for this target's ONNX artifacts.
    """

    name: str
    description: str
    device: str
    runtimes: dict[str, dict[str, Pipeline]]
    default_runtime: str
    capabilities: tuple[str, ...] = ()
    compute_capability: tuple[int, int] | None = None
    execution_provider: str = "CPUExecutionProvider"
    notes: str = ""
    #: ``{model family: {runtime: {precision: Pipeline}}}``: pipelines that replace the default one for
    #: models of that family (a model source's ``family``, e.g. ``transformer``).
    families: dict[str, dict[str, dict[str, Pipeline]]] = field(default_factory=dict)

    @property
    def precisions(self) -> list[str]:
        """Precisions any runtime of this target supports."""
        return sorted({p for r in self.runtimes.values() for p in r})

    def pipeline(self, runtime: str, precision: str, family: str | None = None) -> Pipeline:
        """The default pipeline (``family``'s own when the target has one for this runtime and
        precision). Raises ``KeyError`` naming what is supported."""
        by_family = self.families.get(family or "", {}).get(runtime, {})
        if precision in by_family:
            return by_family[precision]
        if runtime not in self.runtimes:
            raise KeyError(
                f"target '{self.name}' has no runtime '{runtime}' (has: {', '.join(self.runtimes)})"
            )
        by_prec = self.runtimes[runtime]
        if precision not in by_prec:
            raise KeyError(
                f"target '{self.name}' runtime '{runtime}' does not build {precision} (builds: {', '.join(by_prec)})"
            )
        return by_prec[precision]
