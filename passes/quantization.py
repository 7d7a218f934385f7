"""Static INT8 post-training quantization with ``onnxruntime.quantization``, as two passes.

``calibrate`` runs an ONNX Runtime calibrator (min-max, entropy or percentile; or MSE) over
the calibration set and stores the per-tensor ranges (ORT's ``TensorsData`` JSON,
written by ``save_tensors_data``) as a ``calibration.table`` artifact. ``quantize``
inserts QuantizeLinear/DequantizeLinear pairs from that table
(``quantize_static(..., calibration_cache_path=...)``), so changing a quantize option
never recalibrates.

Accuracy-aware INT8 (see :mod:`accelc.passes.sensitivity` for the method):

* ``calibrate`` with ``method: auto`` computes a table per candidate method, quantizes the
  model with each (using the downstream ``quantize`` step's format options, which lowering
  copies into ``selection``), verifies every trial on the validation set and keeps the best.
* ``quantize`` with ``fallback`` set verifies its own output against the quantize stage's
  tolerances (lowering copies them into ``tolerances``). When they are missed it ranks the
  quantized nodes by sensitivity; with ``fallback: auto`` it then keeps the most sensitive
  ones in float until the tolerances hold (at most ``max_fp32_nodes``), and with
  ``fallback: off`` (no permission) its post-check fails the build naming the most
  sensitive nodes and the option to set. Without ``fallback`` it quantizes only, and the
  ``verify`` stage after it checks the tolerances (so changing one reruns nothing).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from accelc.artifacts import Artifact
from accelc.errors import GraphError, PassError, VerificationError
from accelc.pass_api import Pass, PassContext, PassResult, RecipeView, Slot
from accelc.runners import default_threads
from accelc.tolerances import TOLERANCES_SCHEMA

from .bias_correction import recorded_correction
from .calibration import collect_tables
from .loading import load_arrays
from .quantizer import (
    FORMAT_OPTIONS,
    METHODS,
    exclude_nodes,
    format_options,
    quantize_model,
    quantized_op_types,
)
from .sensitivity import (
    Evaluator,
    _latency_feeds,
    _trial_record,
    _validation_evaluator,
    fallback_units,
    only_unit_model,
    p50_latency_ms,
    quality_key,
    rank_units,
    rank_units_sqnr,
    search_fallback,
    sensitivity_label,
    trial_session,
)

# No defaults here: lowering fills these in only where the recipe left them unset.
#: Calibrate options read only by ``method: auto``; quantize options read only with ``fallback`` set.
#: They stay out of the cache key otherwise, so setting them on a plain pass reruns nothing.
_AUTO_ONLY = ("candidates", "selection")
_FALLBACK_ONLY = (
    "max_fp32_nodes", "search", "sensitivity_samples", "sensitivity_method", "tolerances", "batch_size",
    "latency_iterations", "runtime",
)

#: The option that names what runs the trials of ``calibrate: auto`` and ``quantize: fallback``.
_RUNTIME_SCHEMA = {
    "type": "string",
    "pattern": "^[a-z][a-z0-9_-]*$",
    "description": "Runtime that runs every trial (verification, latency, bias correction), by name: a runtime "
    "with a session factory (accelc plugins lists them). Unset: lowering sets the recipe's runtime (ONNX Runtime "
    "for runtimes that do not read ONNX), since ONNX Runtime and OpenVINO execute the same QDQ graph with "
    "different INT8 rounding.",
}

_TOLERANCES_SCHEMA = TOLERANCES_SCHEMA





def _slower_than_float(lat: dict[str, Any]) -> str | None:
    """A sentence when the kept model's p50 is above the float model's (``None`` otherwise)."""
    kept, fp32 = lat.get("kept_ms"), lat.get("fp32_ms")
    if kept and fp32 and kept > fp32:
        return (f"the kept model is slower than the float model at batch 1 ({kept:.3g} ms against {fp32:.3g} ms, "
                "each timed alone): INT8 does not pay here; set verify.min_speedup to fail such builds")
    return None


#: The full INT8 models ``calibrate: auto`` built for its kept table in this process, by what made
#: them (:func:`_int8_key`): ``(raw bytes, corrected bytes, verification metrics, what they were
#: verified on)`` (:func:`_verified_on`). A ``quantize``
#: step after it in the same build would build and verify the very same model; it takes it from
#: here instead (about 3 s of a cold EfficientNet-Lite0 build). Only the last few; a quantize run in
#: another process (a Ray worker) builds its own.
_FULL_INT8: dict[tuple[str, ...], tuple[bytes, bytes, dict[str, Any], tuple[Any, ...]]] = {}
_FULL_INT8_MAX = 2


def _int8_key(
    model: Artifact, table: Path, options: dict[str, Any], runtime: str, calibration: Artifact
) -> tuple[str, ...]:
    """What decides the full INT8 model: the float model, the table's bytes, the format options
    (exclusions and bias correction included), the runtime that corrects and verifies it, the
    calibration samples."""
    import hashlib
    import json

    return (
        model.digest,
        hashlib.sha256(table.read_bytes()).hexdigest(),
        json.dumps(format_options(options), sort_keys=True),
        runtime,
        calibration.digest,
    )


def _verified_on(inputs: dict[str, Artifact], batch: int, runtime: str) -> tuple[Any, ...]:
    """What a trial's verification metrics depend on besides the model: validation set, reference
    outputs, batch size and runtime."""
    return (inputs["validation"].digest, inputs["reference"].digest, batch, runtime)


#: Samples per run of a sensitivity probe model (when the batch dimension is dynamic).
SENSITIVITY_BATCH = 2


#: Methods ``auto`` tries by default. ``mse`` is left out: on EfficientNet-Lite0 it moved the
#: kept model by one crop of 96 (top-1 0.958 -> 0.969 with the same 6 float nodes) for one more
#: trial (about 3 s of a 76 s cold build).
DEFAULT_CANDIDATES = ("minmax", "entropy", "percentile")


class Calibrate(Pass):
    """Collect activation ranges over the calibration set with ONNX Runtime's calibration methods.

    Methods (``onnxruntime.quantization.calibrate``): ``minmax`` (running min/max),
    ``entropy`` (KL-divergence threshold, TensorRT's classic method; 512 histogram bins
    unless ``num_bins`` is set), ``percentile`` (the given percentile of the absolute-value
    histogram, 99.999 by default); and ``mse`` (accelc's: per tensor, the range minimizing the
    histogram's quantization MSE, :func:`accelc.passes.calibration.mse_range`; not in the default
    ``candidates``). Every method's table comes from one streamed collection
    (:func:`accelc.passes.calibration.collect_tables`: ORT's tables, bounded memory).
    ``symmetric`` makes ranges symmetric around 0 (needed for
    symmetric INT8 activations, e.g. TensorRT).

    ``auto`` tries every method in ``candidates``: each table is used to quantize the model
    (with ``selection.quantize``, the downstream quantize step's format options) and the
    quantized model is verified on the validation set against the source model's outputs.
    The table of the trial that scores best (:func:`accelc.passes.sensitivity.quality_key`
    under ``selection.tolerances``) becomes ``calibration.json``; every table is kept under
    ``tables/``. Metrics: ``trials`` (method, verification metrics, p50 latency at batch 1)
    and ``kept``. ``selection.runtime`` is what runs the trials (lowering sets the recipe's).
    The kept trial's INT8 model is remembered in this process (:data:`_FULL_INT8`), so a
    ``quantize`` step with the same format options starts from it instead of building it again.
    """

    name = "calibrate"
    version = "4"
    inputs = (
        Slot("model", ("onnx",)),
        Slot("data", ("calibration.data",)),
        Slot("reference", ("reference.outputs",), optional=True),
        Slot("validation", ("validation.data",), optional=True),
    )
    produces = "calibration.table"
    final = False
    env_packages = ("onnxruntime", "onnx")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "method": {
                "enum": [*METHODS, "auto"],
                "default": "minmax",
                "description": "Range estimator; 'auto' tries each of candidates and keeps the best verified.",
            },
            "candidates": {
                "type": "array",
                "items": {"enum": list(METHODS)},
                "minItems": 1,
                "uniqueItems": True,
                "default": list(DEFAULT_CANDIDATES),
                "description": "Methods tried by 'auto'.",
            },
            "percentile": {
                "type": "number",
                "exclusiveMinimum": 90,
                "maximum": 100,
                "default": 99.999,
                "description": "Percentile of |x| taken as the range (method percentile).",
            },
            "num_bins": {
                "type": "integer",
                "minimum": 128,
                "maximum": 65536,
                "description": "Histogram bins (entropy, percentile); entropy defaults to 512.",
            },
            "symmetric": {"type": "boolean", "default": False, "description": "Ranges symmetric around 0."},
            "moving_average": {
                "type": "boolean",
                "default": False,
                "description": "Exponential moving average of per-batch min/max (method minmax).",
            },
            "batch_size": {
                "type": "integer",
                "minimum": 1,
                "default": 1,
                "description": "Samples per calibration batch (must fit the model's batch dimension).",
            },
            "selection": {
                "type": "object",
                "additionalProperties": False,
                "description": "How 'auto' scores a table; set by lowering from the quantize step and verify.",
                "properties": {
                    "quantize": {"type": "object", "additionalProperties": False, "properties": FORMAT_OPTIONS},
                    "tolerances": _TOLERANCES_SCHEMA,
                    "batch_size": {"type": "integer", "minimum": 1},
                    "latency_iterations": {"type": "integer", "minimum": 1, "default": 20},
                    "runtime": _RUNTIME_SCHEMA,
                },
            },
        },
    }

    def configure(self, options: dict[str, Any], recipe: RecipeView, where: str) -> dict[str, Any]:
        """``method: auto`` gets ``selection``: the format options of the next ``quantize`` step (with
        the runtime's defaults, so each trial is quantized as the build will be), the quantize
        stage's tolerances (the recipe's when that stage is not verified), the verify batch size
        and the trial runtime. A fixed method needs nothing from the recipe."""
        if options.get("method") != "auto":
            return options
        q = recipe.next_step("quantize")
        fmt: dict[str, Any] = {}
        if q is not None:
            full = recipe.full_options("quantize", dict(q.options))
            fmt = {k: v for k, v in full.items() if k in FORMAT_OPTIONS}
        selection = {
            "quantize": fmt,
            "tolerances": recipe.stage_tolerances("quantize") or dict(recipe.tolerances),
            "batch_size": recipe.verify_batch_size,
            "runtime": recipe.trial_runtime,
            **options.get("selection", {}),
        }
        return {**options, "selection": selection}

    def uses_inputs(self, options: dict[str, Any]) -> set[str]:
        """Optional slots this invocation needs: the validation set and reference outputs for ``auto``."""
        return {"reference", "validation"} if options.get("method") == "auto" else set()

    def key_material(self, options: dict[str, Any], host: Any, sources: Any) -> dict[str, Any]:
        """Options minus those only ``auto`` reads, when the method is fixed."""
        material = super().key_material(options, host, sources)
        if options.get("method") != "auto":
            material["options"] = {k: v for k, v in material["options"].items() if k not in _AUTO_ONLY}
        return material

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        data = load_arrays(inputs["data"])
        n = len(data[ctx.signature.names[0]])
        if options["method"] != "auto":
            from onnxruntime.quantization.calibrate import save_tensors_data

            ranges = self._collect(ctx, inputs["model"].file, data, [options["method"]], options)[options["method"]]

            save_tensors_data(ranges, ctx.workdir / "calibration.json")
            return PassResult(
                "calibration.json", metrics={"method": options["method"], "samples": n, "tensors": len(ranges.data)}
            )
        return self._auto(ctx, inputs, data, options)

    def _collect(
        self, ctx: PassContext, model: Path, data: dict[str, np.ndarray], methods: list[str], options: dict[str, Any]
    ) -> dict[str, Any]:
        """``{method: TensorsData}`` for ``methods``, from one streamed collection
        (:func:`accelc.passes.calibration.collect_tables`)."""
        batch = min(options["batch_size"], ctx.signature.max_batch())
        ctx.progress(f"calibrating ({', '.join(methods)})")
        return collect_tables(
            model, data, ctx.signature.names, batch, methods, options, scratch=ctx.scratch, progress=ctx.progress
        )

    def _auto(
        self, ctx: PassContext, inputs: dict[str, Artifact], data: dict[str, np.ndarray], options: dict[str, Any]
    ) -> PassResult:
        from onnxruntime.quantization.calibrate import save_tensors_data

        for slot in ("reference", "validation"):
            if slot not in inputs:
                raise PassError(f"calibrate method 'auto' needs the '{slot}' input (add data.validation to the recipe)")
        sel = options.get("selection", {})
        tolerances = sel.get("tolerances", {})
        runtime = sel.get("runtime", "onnxruntime")
        evaluator = _validation_evaluator(inputs, ctx, sel.get("batch_size", 16), runtime)
        tables = ctx.workdir / "tables"
        tables.mkdir()
        trials: list[dict[str, Any]] = []
        verified: dict[str, dict[str, Any]] = {}
        tensors = 0
        with tempfile.TemporaryDirectory(prefix="accelc-calib-trials-", dir=ctx.scratch) as tmp:
            models: dict[str, str | Path] = {"fp32": inputs["model"].file}
            clock = time.perf_counter()
            collected = self._collect(ctx, inputs["model"].file, data, list(options["candidates"]), options)
            timing = {"collect": time.perf_counter() - clock}
            clock = time.perf_counter()
            for i, method in enumerate(options["candidates"]):
                ctx.progress("calibration trials (one per method)", i, len(options["candidates"]))
                ranges = collected[method]
                tensors = len(ranges.data)
                table = tables / f"{method}.json"
                save_tensors_data(ranges, table)
                ctx.progress(f"trial {method}: quantize and verify")
                fmt = sel.get("quantize", {})
                raw = quantize_model(
                    inputs["model"].file, table, Path(tmp) / f"{method}_raw.onnx", {**fmt, "bias_correction": False}
                )
                q = exclude_nodes(
                    inputs["model"].file, raw, Path(tmp) / f"{method}.onnx", fmt, [], calibration=data,
                    session=evaluator.session,
                )
                rec = {"method": method, **({"percentile": options["percentile"]} if method == "percentile" else {})}
                verified[method] = evaluator.metrics(q)
                rec.update(_trial_record(verified[method], tolerances))
                trials.append(rec)
                models[method] = q
                ctx.progress("calibration trials (one per method)", i + 1, len(options["candidates"]))
            timing["trials"] = time.perf_counter() - clock
            clock = time.perf_counter()
            lat = p50_latency_ms(
                ctx, models, _latency_feeds(evaluator), runtime, sel.get("latency_iterations", 20)
            )
            timing["latency"] = time.perf_counter() - clock
            for rec in trials:
                rec["p50_ms"] = lat[rec["method"]]
            # max() keeps the first of equal keys: candidates are tried in the order given
            best = max(trials, key=lambda r: quality_key(r, tolerances))
            for rec in trials:
                rec["kept"] = rec is best
            shutil.copyfile(tables / f"{best['method']}.json", ctx.workdir / "calibration.json")
            # the kept trial's INT8 model, for a quantize step that would build the same one
            key = _int8_key(
                inputs["model"], ctx.workdir / "calibration.json", sel.get("quantize", {}), runtime, inputs["data"]
            )
            if len(_FULL_INT8) >= _FULL_INT8_MAX:
                _FULL_INT8.pop(next(iter(_FULL_INT8)))
            _FULL_INT8[key] = (
                (Path(tmp) / f"{best['method']}_raw.onnx").read_bytes(),
                Path(models[best["method"]]).read_bytes(),
                verified[best["method"]],
                _verified_on(inputs, evaluator.batch, runtime),
            )
        return PassResult(
            "calibration.json",
            metrics={
                "method": best["method"],
                "runtime": runtime,
                "samples": len(data[ctx.signature.names[0]]),
                "tensors": tensors,
                "latency": {
                    "batch": 1,
                    "threads": default_threads(),
                    "fp32_ms": lat["fp32"],
                    "kept_ms": lat[best["method"]],
                },
                "timing_s": {k: round(v, 2) for k, v in timing.items()},
                "trials": trials,
            },
        )


class Quantize(Pass):
    """Insert QDQ pairs (static INT8) from a calibration table with ``onnxruntime.quantization.quantize_static``.

    Defaults follow ORT's guidance for x86 CPUs with VNNI: u8 activations, s8 weights,
    per-channel weights, no reduce_range. For TensorRT use s8 activations with
    symmetric ranges (``activation_type: int8``, ``activation_symmetric: true``).
    ``nodes_to_exclude`` keeps the named nodes in float (pinned against ORT's
    load-time re-quantization, see :func:`pin_float_nodes`). ``bias_correction`` (on by
    default) then corrects the quantized layers' INT32 biases on the calibration samples
    (:mod:`accelc.passes.bias_correction`); every trial below is corrected the same way, and
    the metrics report it under ``bias_correction``.

    With ``fallback`` set (``off`` or ``auto``) lowering copies the quantize stage's verify
    tolerances into ``tolerances`` and the pass verifies its output on the validation set
    (the numbers ``verify`` reports for the same model). If the tolerances are missed it
    ranks the quantized nodes by sensitivity (one node quantized at a time against the
    float graph, on ``sensitivity_samples`` calibration samples; see
    :mod:`accelc.passes.sensitivity`) and, with ``fallback: auto``, keeps the most
    sensitive ``k <= max_fp32_nodes`` of them in float. ``search: greedy`` (default) tries
    ``k = 1, 2, ...`` and keeps the first that passes, the smallest in ranking order; ``bisect``
    needs about ``log2(max_fp32_nodes)`` trials but assumes the metric improves with ``k``, which
    top-1 agreement on a small set of near-tie samples need not do. ``max_fp32_nodes`` counts
    quantized nodes; an activation folded into a node (Clip, Relu) falls back with it and is
    not counted. The model is quantized once (``quantize_static``); each trial is that model
    with its nodes made float again by graph surgery and bias-corrected afresh
    (:func:`accelc.passes.quantizer.exclude_nodes`, the same model a ``nodes_to_exclude`` call
    would write, without a quantizer run per trial). When ``calibrate: auto`` already built
    this full INT8 model in this process (its kept trial: same float model, table, calibration
    samples, format options and runtime), that model and its verification are taken from it
    instead (``full_int8`` in the metrics says so). Every trial is recorded
    (``trials``: nodes excluded, verification metrics, p50 latency at batch 1, each model timed
    alone in a worker process, the float one too), with ``sensitivity`` and ``latency`` (float,
    full INT8 and kept model, p50 ms; ``slower_than_float`` says so when the kept model is).
    The post-check fails the build when no trial met the tolerances, naming the most sensitive
    nodes and what to change. Without ``fallback``
    the pass only quantizes. ``runtime`` (set by lowering from the recipe) is what runs the
    trials, the sensitivity models and the latency: the accuracy the search accepts is the
    deployed runtime's.
    """

    name = "quantize"
    version = "5"
    inputs = (
        Slot("model", ("onnx",)),
        Slot("table", ("calibration.table",)),
        Slot("calibration", ("calibration.data",), optional=True),
        Slot("reference", ("reference.outputs",), optional=True),
        Slot("validation", ("validation.data",), optional=True),
    )
    produces = "onnx.qdq"
    env_packages = ("onnxruntime", "onnx")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **FORMAT_OPTIONS,
            "fallback": {
                "enum": ["off", "auto"],
                "description": "Check the quantize stage's tolerances here: 'auto' keeps the most sensitive "
                "nodes in float until they hold, 'off' fails naming them. Unset: plain "
                "quantization, checked by verify alone.",
            },
            "max_fp32_nodes": {
                "type": "integer",
                "minimum": 0,
                "default": 8,
                "description": "Most quantized nodes 'auto' may keep in float.",
            },
            "search": {
                "enum": ["greedy", "bisect"],
                "default": "greedy",
                "description": "How 'auto' searches the count of float nodes.",
            },
            "sensitivity_samples": {
                "type": "integer",
                "minimum": 1,
                "default": 16,
                "description": "Calibration samples used to rank nodes by sensitivity.",
            },
            "sensitivity_method": {
                "enum": ["one_at_a_time", "sqnr"],
                "default": "one_at_a_time",
                "description": "How nodes are ranked: 'one_at_a_time' (the output error of the float model with "
                "only that node quantized, one model per node) or 'sqnr' (the noise each node adds inside the "
                "full INT8 model, from one instrumented run: faster, but blind to how much later layers "
                "amplify early noise).",
            },
            "tolerances": {
                **_TOLERANCES_SCHEMA,
                "description": "Set by lowering from verify (the quantize stage's tolerances).",
            },
            "batch_size": {
                "type": "integer",
                "minimum": 1,
                "description": "Validation batch size (set by lowering from verify.batch_size).",
            },
            "latency_iterations": {
                "type": "integer",
                "minimum": 1,
                "default": 40,
                "description": "Timed runs per trial for the side-by-side latency in the report.",
            },
            "runtime": _RUNTIME_SCHEMA,
        },
    }

    def configure(self, options: dict[str, Any], recipe: RecipeView, where: str) -> dict[str, Any]:
        """``runtime`` (what measures bias correction and runs the trials): the recipe's trial runtime.
        With ``fallback`` set, also the quantize stage's tolerances (those of the first verified
        stage from quantize on: ``openvino_ir`` when the QDQ model is verified only as the
        runtime's IR) and the verify batch size; they stay in the cache key, since they decide
        which nodes are excluded.

        Raises:
            GraphError: ``fallback`` is set but no stage from quantize on is verified and the step
                sets no ``tolerances`` itself.
        """
        opts = dict(options)
        if opts.get("bias_correction", True) or opts.get("fallback"):
            opts.setdefault("runtime", recipe.trial_runtime)
        if not opts.get("fallback"):
            return opts  # plain quantization: verify alone checks it, and a tolerance change reruns nothing
        tol = recipe.stage_tolerances("quantize")
        if tol:
            opts.setdefault("tolerances", tol)
            opts.setdefault("batch_size", recipe.verify_batch_size)
        elif not opts.get("tolerances"):
            raise GraphError(
                f"{where}: quantize.fallback '{opts['fallback']}' needs the quantize stage's tolerances, but that "
                "stage is not verified (add data.validation, keep 'quantize' in verify.after, set verify.tolerances)"
            )
        return opts

    def uses_inputs(self, options: dict[str, Any]) -> set[str]:
        """Optional slots this invocation needs: all three when it checks itself (``fallback`` set),
        the calibration samples for ``bias_correction``."""
        wanted = {"calibration", "reference", "validation"} if options.get("fallback") else set()
        return wanted | ({"calibration"} if options.get("bias_correction", True) else set())

    def key_material(self, options: dict[str, Any], host: Any, sources: Any) -> dict[str, Any]:
        """Options minus those only the accuracy check reads, when ``fallback`` is unset."""
        material = super().key_material(options, host, sources)
        if not options.get("fallback"):
            # bias correction measures on ``runtime`` too, so it stays in the key while correction is on
            keep = ("runtime",) if options.get("bias_correction", True) else ()
            material["options"] = {
                k: v for k, v in material["options"].items() if k not in _FALLBACK_ONLY or k in keep
            }
        return material

    def run(self, ctx: PassContext, inputs: dict[str, Artifact], options: dict[str, Any]) -> PassResult:
        import onnx

        model_path = inputs["model"].file
        model = onnx.load(str(model_path))
        names = {n.name for n in model.graph.node}
        user_excl = list(options["nodes_to_exclude"])
        unknown = [n for n in user_excl if n not in names]
        if unknown:
            raise PassError(f"quantize.nodes_to_exclude: no node named {', '.join(unknown)} in the graph")
        table = inputs["table"].file
        out = ctx.workdir / "model.onnx"
        calibration = load_arrays(inputs["calibration"]) if "calibration" in inputs else None
        if options["bias_correction"]:
            ctx.progress("quantize and correct biases")
        tolerances = options.get("tolerances") or {}
        runtime = options.get("runtime", "onnxruntime")
        reuse = (
            _FULL_INT8.get(_int8_key(inputs["model"], table, options, runtime, inputs["calibration"]))
            if "calibration" in inputs
            else None
        )
        if not options.get("fallback") or not tolerances:
            if reuse:  # calibrate already built and corrected this very model
                out.write_bytes(reuse[1])
            else:
                session = trial_session(ctx, runtime)
                quantize_model(model_path, table, out, options, calibration=calibration, session=session)
            return PassResult("model.onnx", metrics=self._facts(out, user_excl), meta=inputs["model"].meta)
        for slot in ("reference", "validation"):
            if slot not in inputs:
                raise PassError(f"quantize.fallback needs the '{slot}' input (add data.validation to the recipe)")

        evaluator = _validation_evaluator(inputs, ctx, options.get("batch_size", 16), runtime)
        timing: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(what: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timing[what] = timing.get(what, 0.0) + now - clock
            clock = now

        with tempfile.TemporaryDirectory(prefix="accelc-quant-trials-", dir=ctx.scratch) as tmp_dir:
            tmp = Path(tmp_dir)
            # quantized once; every trial below is this model with some nodes made float again
            full = tmp / "trial0.onnx"
            if reuse:  # calibrate: auto built and verified it already (its kept trial)
                raw = tmp / "raw.onnx"
                raw.write_bytes(reuse[0])
                full.write_bytes(reuse[1])
                same = reuse[3] == _verified_on(inputs, evaluator.batch, runtime)
                verified = reuse[2] if same else evaluator.metrics(full)
            else:
                ctx.progress("full INT8: quantize and verify")
                raw = quantize_model(model_path, table, tmp / "raw.onnx", {**options, "bias_correction": False})
                exclude_nodes(model_path, raw, full, options, [], calibration=calibration, session=evaluator.session)
                verified = evaluator.metrics(full)
            first = {"trial": 0, "fp32_nodes": [], **_trial_record(verified, tolerances)}
            trials, files = [first], {0: full}
            ranking: list[dict[str, Any]] = []
            kept: dict[str, Any] | None = first if first["passed"] else None
            sens_info: dict[str, Any] = {}
            lap("full INT8")
            if kept is None:
                ranking, sens_info = self._rank(ctx, inputs, options, model, full, evaluator, calibration)
                lap("sensitivity")
            if kept is None and options["fallback"] == "auto":

                def trial(k: int) -> dict[str, Any]:
                    fp32 = [r["node"] for r in ranking[:k]]
                    excl = [n for r in ranking[:k] for n in r["nodes"]]
                    ctx.progress(
                        f"fallback trial {len(trials)} ({k} node(s) in float, at most {options['max_fp32_nodes']})"
                    )
                    path = exclude_nodes(
                        model_path,
                        raw,
                        tmp / f"trial{len(trials)}.onnx",
                        options,
                        excl,
                        calibration=calibration,
                        session=evaluator.session,
                    )
                    rec = {
                        "trial": len(trials),
                        "fp32_nodes": fp32,
                        **_trial_record(evaluator.metrics(path), tolerances),
                    }
                    files[rec["trial"]] = path
                    trials.append(rec)
                    return rec

                kept = search_fallback(ranking, options["max_fp32_nodes"], trial, options["search"])
                lap("fallback trials")
            chosen = kept or first
            shutil.copyfile(files[chosen["trial"]], out)
            lat = p50_latency_ms(
                ctx,
                {"fp32": model_path, **{str(t): p for t, p in files.items()}},
                _latency_feeds(evaluator),
                runtime,
                options["latency_iterations"],
            )
            lap("latency")
        for rec in trials:
            rec["p50_ms"] = lat[str(rec["trial"])]
            rec["kept"] = kept is not None and rec is kept
        excluded = user_excl + [n for r in ranking[: len(chosen["fp32_nodes"])] for n in r["nodes"]]
        metrics = {
            "kept": "none (tolerances missed)"
            if kept is None
            else ("full INT8" if not kept["fp32_nodes"] else f"{len(kept['fp32_nodes'])} node(s) in float"),
            **self._facts(out, excluded),
            "fp32_nodes": chosen["fp32_nodes"] if kept is not None else [],
            "tolerances": tolerances,
            "runtime": runtime,
            "latency": {
                "batch": 1,
                "threads": default_threads(),
                "fp32_ms": lat["fp32"],
                "int8_ms": lat["0"],
                "kept_ms": lat[str(chosen["trial"])],
            },
            "timing_s": {k: round(v, 2) for k, v in timing.items()},
            **({"full_int8": "calibrate's kept trial"} if reuse else {}),
            "trials": trials,
            "sensitivity": ranking,
            **sens_info,
        }
        slow = _slower_than_float(metrics["latency"])
        if slow:
            metrics["slower_than_float"] = slow
            ctx.log.warning(slow)
        if kept is None:
            best = max(trials, key=lambda r: quality_key(r, tolerances))
            metrics["tolerance_failures"] = best["failures"]
            metrics["best_trial"] = best["trial"]
        return PassResult("model.onnx", metrics=metrics, meta=inputs["model"].meta)

    def _rank(
        self,
        ctx: PassContext,
        inputs: dict[str, Artifact],
        options: dict[str, Any],
        model: Any,
        full: Path,
        validation: Evaluator,
        calibration: dict[str, np.ndarray] | None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Sensitivity ranking on ``sensitivity_samples`` calibration samples spread evenly over the set
        (validation samples when no calibration set is wired), against the float model's own outputs there."""
        import onnx

        if calibration is not None:
            arrays, source = calibration, "calibration"
        else:
            arrays, source = validation.arrays, "validation"
        total = len(arrays[ctx.signature.names[0]])
        # spread over the whole set: sets are often ordered by source image
        pick = np.unique(np.linspace(0, total - 1, min(options["sensitivity_samples"], total)).round().astype(int))
        arrays = {n: arrays[n][pick] for n in ctx.signature.names}
        rt, sess = validation.runtime, validation.session
        names, batch, threads = ctx.signature.names, validation.batch, validation.threads
        if ctx.signature.inputs[0].batch_dim() is not None:
            # small runs: 16 samples at batch 2 took 87 ms per probe model against 118 ms at batch 16
            # (EfficientNet-Lite0, 2 threads), over 59 probes
            batch = min(batch, SENSITIVITY_BATCH)
        float_out = arrays[names[0]]  # the samples analysed (for their count)
        evaluator = None
        if options.get("sensitivity_method") != "sqnr":
            ctx.progress("sensitivity: float model outputs")
            probe = Evaluator(arrays, names, np.zeros(0), batch, threads, runtime=rt, session=sess)
            float_out = probe.outputs(inputs["model"].file)
            evaluator = Evaluator(arrays, names, float_out, batch, threads, runtime=rt, session=sess)
        qdq = onnx.load(str(full))
        units = fallback_units(model, qdq, quantized_op_types(options), options["nodes_to_exclude"])
        if options.get("sensitivity_method") == "sqnr":
            ctx.progress("sensitivity: noise each node adds (one instrumented run)")
            ranking = rank_units_sqnr(units, model, qdq, arrays, names, min(batch, 8), threads, sess)
            method = "noise each node adds: output NSR minus input NSR, one run of the float and full INT8 models"
        else:
            ranking = rank_units(units, lambda u: only_unit_model(model, qdq, u), evaluator, ctx.progress)
            method = "one node quantized at a time (as in the full INT8 model, bias correction included)"
        info = {
            "sensitivity_data": {
                "set": source,
                "samples": len(float_out),
                "compared_with": "float ONNX model",
                "method": method,
            }
        }
        return ranking, info

    @staticmethod
    def _facts(out: Path, excluded: list[str]) -> dict[str, Any]:
        import onnx

        q = onnx.load(str(out))
        facts = {
            "excluded_nodes": len(excluded),
            "quantize_linear_nodes": sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear"),
            "size_mib": round(out.stat().st_size / 2**20, 3),
        }
        corrected = recorded_correction(q)
        if corrected is not None:
            facts["bias_correction"] = corrected
        return facts

    def check(self, result_metrics: dict[str, Any], options: dict[str, Any]) -> None:
        """Fail when no trial met the tolerances, naming the most sensitive nodes and the option to change."""
        failures = result_metrics.get("tolerance_failures")
        if not failures:
            return
        top = result_metrics.get("sensitivity", [])[:5]
        ranked = ", ".join(f"{r['node']} ({r['op_type']}, {sensitivity_label(r)})" for r in top)
        msg = f"INT8 misses the tolerances: {'; '.join(failures)}. Most sensitive nodes: {ranked or 'none'}"
        if options.get("fallback") != "auto":
            msg += (
                ". To keep the most sensitive nodes in float until the tolerances hold, set "
                "quantize: {fallback: auto, max_fp32_nodes: N} in the recipe's passes"
            )
        else:
            n = options.get("max_fp32_nodes", 0)
            msg += (
                f". No fallback of at most {n} node(s) (quantize.max_fp32_nodes) met them; raise "
                "max_fp32_nodes or relax the quantize stage's tolerances"
            )
        raise VerificationError(msg)
