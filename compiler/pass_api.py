"""The contract between accelc and every pass, built-in or third-party.

A pass is an object with a name, a version, typed input slots, one output kind,
the host capabilities it requires and a JSON Schema for its options. ``run`` gets
its inputs (artifacts already in the store) and validated options, writes files
into ``ctx.workdir`` and returns a :class:`PassResult`. It does not read the
recipe, the cache or the CLI: everything it needs arrives through its arguments,
which is what makes the cache key (inputs + options + versions) complete.

The shape follows onnx-ir's pass infrastructure: one ``run`` call, a result that
says what came out, and contract checks that name the pass that broke them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .artifacts import Artifact
from .errors import BuildTimeoutError
from .signature import InputSignature

T = TypeVar("T")
#: Default limit (seconds) on user code run through :meth:`PassContext.call_user_code` (a model
#: source's ``load``): generous for real models (minutes at most), short of "forever".
DEFAULT_USER_CODE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Slot:
    """A named input of a pass and the artifact kinds it accepts.

    Lowering wires each slot to the most recent upstream node whose output kind is
    in ``kinds`` (or, with ``runnable=True``, any kind a plugin declared runnable);
    ``source=True`` wires it to the *first* such node instead (used by ``reference``,
    which must see the unmodified source model). ``runs=True`` says the pass executes
    this input, so its node needs what executing the wired kind needs (the kind's
    ``requires``; on a CUDA target the device, for a device-bound kind).
    """

    name: str
    kinds: tuple[str, ...] = ()
    source: bool = False
    optional: bool = False
    runnable: bool = False
    runs: bool = False

    def accepts(self, kind: str, kinds: dict[str, Any]) -> bool:
        """Whether an artifact of ``kind`` may be wired here (``kinds``: the registry's artifact kinds)."""
        if kind in self.kinds:
            return True
        return self.runnable and kind in kinds and kinds[kind].runnable


@dataclass(frozen=True)
class RecipeView:
    """What a pass may read of the recipe while it is lowered (:meth:`Pass.configure`).

    Attributes:
        runtime: the recipe's runtime (the target's default when the recipe names none).
        trial_runtime: the runtime trials run on: ``runtime`` when it has a session factory,
            else ``onnxruntime`` (:func:`accelc.runners.trial_runtime`).
        device: the target's device (``cpu``, ``cuda``).
        tolerances: the recipe's ``verify.tolerances`` (``{tolerance name: bound}``).
        verify_batch_size: ``verify.batch_size``.
        benchmark: the recipe's ``benchmark`` settings, ``enabled`` left out.
        signature: the input signature.
        later: the pipeline steps after the one being lowered (:class:`accelc.targets.PassStep`).
        verified: the step names after which ``verify`` runs.
        stage_tolerances_of: ``{step name: tolerances}`` of every verified stage.
        full_options: ``full_options(pass name, options)``: ``options`` with the runtime's
            defaults for that pass and the pass's schema defaults filled in.
        verify: the recipe's ``verify`` section as written (``after``, ``tolerances``,
            ``stages``, ``batch_size`` and the comparison settings ``output``, ``recall_k``,
            ``degenerate``: how outputs are compared, which a pass that compares outputs itself
            reads here so that it judges them as ``verify`` will). Empty when the recipe has none.
    """

    runtime: str
    trial_runtime: str
    device: str
    tolerances: dict[str, float]
    verify_batch_size: int
    benchmark: dict[str, Any]
    signature: InputSignature
    later: tuple[Any, ...]
    verified: tuple[str, ...]
    stage_tolerances_of: dict[str, dict[str, float]]
    full_options: Callable[[str, dict[str, Any]], dict[str, Any]]
    verify: dict[str, Any] = field(default_factory=dict)

    def stage_tolerances(self, step: str) -> dict[str, float]:
        """Tolerances of the first verified stage from ``step`` on: ``step`` itself, or the later
        step that puts its output in the runtime's own format (``openvino_ir`` after
        ``quantize``). Empty when no stage from ``step`` on is verified."""
        for s in [step, *(s.name for s in self.later)]:
            if s in self.verified:
                return dict(self.stage_tolerances_of[s])
        return {}

    def next_step(self, name: str) -> Any | None:
        """The first later step running pass ``name`` (a :class:`accelc.targets.PassStep`), or ``None``."""
        return next((s for s in self.later if s.name == name), None)


@dataclass
class PassResult:
    """What a pass produced: the primary file's name inside ``ctx.workdir``, and facts about it.

    ``metrics`` are numbers shown in the report (``top1_agreement``, ``p50_ms``...);
    ``meta`` is carried with the artifact for downstream passes and runners. ``kind``, when a
    pass states it, must equal the kind the pass declares (the executor refuses a mismatch,
    naming the plugin); ``None`` means the declared kind.
    """

    main: str
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None


@dataclass
class PassContext:
    """What a running pass may use besides its inputs and options.

    Attributes:
        workdir: empty staging directory; everything written here becomes the artifact.
        signature: the model's input signature from the recipe (names, shapes, dtypes, dynamic dims).
        host: capabilities of this host (see :mod:`accelc.host`).
        runners: ``make_runner(artifact, device=..., threads=...)`` for executing any runnable kind.
        sources: registry of model and data sources (used by the loading passes).
        log: a logger whose lines show under the running pass in the progress display.
        scratch: a directory for temporary files (calibration's augmented model, trial models),
            kept out of the artifact and under the cache root, so `accelc cache gc` reclaims it if
            the build is killed (``None``: the system temp dir). Removed when the pass ends.
        user_code_timeout: seconds that user code run through :meth:`call_user_code` may take
            (``None``: no limit).
    """

    workdir: Path
    signature: InputSignature
    host: Any
    runners: Any
    sources: Any
    node: str
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("accelc.pass"))
    #: ``progress(message)``, or ``progress(message, done, total)`` for counted steps (a progress bar)
    progress: Callable[..., None] = lambda *_a, **_k: None
    scratch: Path | None = None
    user_code_timeout: float | None = None

    def call_user_code(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` under a watchdog: user code (a model's callable) that does not return within
        ``user_code_timeout`` seconds fails the pass instead of hanging the build.

        Python cannot stop a thread, so ``fn`` runs in a daemon thread and this call stops
        waiting at the deadline: the pass fails, the executor releases the key's lock and removes
        the staging dir, and the abandoned thread ends with the process (``accelc build`` exits
        right after). Exceptions from ``fn`` are re-raised here unchanged.

        Raises:
            BuildTimeoutError: ``fn`` did not return in time (names the node and ``what``).
        """
        if self.user_code_timeout is None:
            return fn()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the waiting thread
                box["error"] = e

        worker = threading.Thread(target=target, name=f"accelc-user-code-{self.node}", daemon=True)
        worker.start()
        worker.join(self.user_code_timeout)
        if worker.is_alive():
            raise BuildTimeoutError(
                f"pass '{self.node}': {what} did not return within {self.user_code_timeout:g} s "
                "(--user-code-timeout); the build gave up on it and released its cache lock"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]


class Pass:
    """Base class of passes. Subclasses set the class attributes and implement :meth:`run`.

    Class attributes:
        name: registry name used in recipes (``calibrate``).
        version: bump when the output for the same inputs and options changes; part of the cache key.
        inputs: input slots, in order.
        produces: output artifact kind.
        requires: host capabilities, e.g. ``("cuda", "tensorrt", "sm>=75")``.
        options_schema: JSON Schema (2020-12) of the options object; defaults are filled in from it.
        env_packages: distributions whose versions change the output; their versions enter the cache key.
        key_ignores: option names that do not change the artifact (e.g. verify tolerances), left out of the key.
        final: whether the output can be the build's deployable artifact.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    inputs: ClassVar[tuple[Slot, ...]] = ()
    produces: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    options_schema: ClassVar[dict[str, Any]] = {"type": "object", "additionalProperties": False}
    env_packages: ClassVar[tuple[str, ...]] = ()
    key_ignores: ClassVar[tuple[str, ...]] = ()
    final: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def configure(self, options: dict[str, Any], recipe: RecipeView, where: str) -> dict[str, Any]:
        """The options of this invocation given the rest of the recipe, called by lowering before
        the options are validated against :attr:`options_schema` (once, after this returns).

        ``options`` are the step's own (the runtime's defaults for this pass already merged in);
        ``recipe`` is all a pass may read of the recipe; ``where`` names the step for errors.
        Default: ``options`` unchanged. Raise :class:`accelc.errors.GraphError` naming ``where``
        when the recipe cannot give the pass what it needs.
        """
        return options

    def output_kind(self, options: dict[str, Any]) -> str:
        """The artifact kind this invocation produces (``produces`` unless it depends on options)."""
        return self.produces

    def key_extras(self, options: dict[str, Any], host: Any) -> dict[str, Any]:
        """Host facts that change this pass's output (GPU name, CPU model...). Default: none."""
        return {}

    def key_material(self, options: dict[str, Any], host: Any, sources: Any) -> dict[str, Any]:
        """What of this invocation enters the cache key besides name, version, inputs and versions.

        Default: the options minus ``key_ignores``, plus :meth:`key_extras`. Source passes
        override it to use content digests instead of file paths.
        """
        material: dict[str, Any] = {
            "options": {k: v for k, v in options.items() if k not in self.key_ignores}
        }
        extras = self.key_extras(options, host)
        if extras:
            material["host"] = extras
        return material

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        """Produce the output artifact's files in ``ctx.workdir``. Raise ``PassError`` on failure."""
        raise NotImplementedError

    def check(self, result_metrics: dict[str, Any], options: dict[str, Any]) -> None:
        """Post-condition on a (possibly cached) result, e.g. tolerances. Raise ``VerificationError``."""
        return None

    @classmethod
    def summary(cls) -> str:
        """First line of the description or docstring."""
        text = cls.description or (cls.__doc__ or "")
        return text.strip().splitlines()[0] if text.strip() else ""
