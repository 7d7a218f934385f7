"""Pure helpers of ``benchmarks.compare``: statistics over alternated timing rounds, ratios to
eager FP32 and to the best alternative, issue #4's targets, and the table, Markdown and JSON
shapes. Nothing here imports torch or onnxruntime, so it is tested with small fake data.

Units everywhere: latency in ms, throughput in samples/s, memory in MiB, build time in s.

A *variant* result (one row of the table) is a dict::

    {"label": str, "status": "ok" | "skipped" | "failed", "reason": str | None,
     "verified": bool | None,            # accelc only: did the build pass the recipe's verification
     "latency": latency_summary(...) | None,          # batch 1
     "throughput": throughput_summary(...) | None,    # the larger batch
     "peak_rss_mib": float | None,
     "quality": {"top1_agreement", "cosine", "cosine_min", "max_abs_error", "samples"} | None,
     "build": {"cold_s": float | None, "warm_s": float | None, "note": str},
     "ratios": {...}}                    # filled by finish_recipe

and a *recipe* result holds ``variants`` (name -> variant result, in :data:`VARIANTS` order)
plus what :func:`finish_recipe` adds: ``best_alternative`` and ``targets``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The variants in table order: the starting point, four alternatives, accelc's artifact.
VARIANTS: tuple[str, ...] = ("eager", "compile", "ort_fp32", "ov_fp32", "ort_int8_qs", "accelc")
LABELS: dict[str, str] = {
    "eager": "eager PyTorch FP32 (inference_mode)",
    "compile": "torch.compile FP32 (default mode)",
    "ort_fp32": "ONNX Runtime FP32 (default export)",
    "ov_fp32": "OpenVINO's default: ov.Core().compile_model of the default FP32 export, only the thread count "
    "and the LATENCY hint set (float ops run in bf16 on CPUs that have it)",
    "ort_int8_qs": "ONNX Runtime INT8 (quantize_static defaults)",
    "accelc": "accelc artifact",
}
#: Short row labels for the tables.
SHORT_LABELS: dict[str, str] = {
    "eager": "eager FP32",
    "compile": "torch.compile FP32",
    "ort_fp32": "ORT FP32",
    "ov_fp32": "OpenVINO default",
    "ort_int8_qs": "ORT INT8 quantize_static",
    "accelc": "accelc",
}
BASELINE = "eager"
CANDIDATE = "accelc"
#: Version of the JSON document's layout; bump it when a key changes meaning.
SCHEMA_VERSION = 2


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of the variants' worker processes in timing round ``round_index``: ``names``
    rotated by the round index, so no variant always runs first, last, or right after the same
    neighbour (a machine warmed or loaded by it)."""
    if not names:
        return []
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def spread_pct(values: Sequence[float]) -> float:
    """``(max - min) / median * 100`` of ``values`` (0 for a single value). Raises ValueError when empty."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("spread of no values")
    med = float(np.median(a))
    return 0.0 if med == 0 else float((a.max() - a.min()) / med * 100.0)


def latency_summary(rounds: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Latency statistics in ms from per-round, per-iteration wall times in **seconds**.

    - ``p50_ms``: median of the per-round medians (one disturbed round does not move it);
      ``p50_min_ms`` / ``p50_max_ms`` are the per-round medians' range and ``spread_pct``
      is that range relative to ``p50_ms``.
    - ``p99_ms``: 99th percentile of all iterations pooled (a single round has too few for a tail);
      ``p99_min_ms`` / ``p99_max_ms`` are the per-round 99th percentiles' range.
    - ``mean_ms``, ``rounds``, ``iterations`` (pooled count), ``p50_per_round_ms``.

    Percentiles are numpy's linear interpolation, as in accelc's ``benchmark`` pass.
    Raises ValueError when no round holds a timing.
    """
    arrays = [np.asarray(r, dtype=np.float64) * 1e3 for r in rounds if len(r)]
    if not arrays:
        raise ValueError("no timings")
    p50s = np.array([np.percentile(a, 50) for a in arrays])
    p99s = np.array([np.percentile(a, 99) for a in arrays])
    pooled = np.concatenate(arrays)
    return {
        "p50_ms": float(np.median(p50s)),
        "p50_min_ms": float(p50s.min()),
        "p50_max_ms": float(p50s.max()),
        "spread_pct": spread_pct(p50s),
        "p99_ms": float(np.percentile(pooled, 99)),
        "p99_min_ms": float(p99s.min()),
        "p99_max_ms": float(p99s.max()),
        "mean_ms": float(pooled.mean()),
        "rounds": len(arrays),
        "iterations": int(pooled.size),
        "p50_per_round_ms": [float(x) for x in p50s],
    }


def throughput_summary(rounds: Sequence[Sequence[float]], batch: int) -> dict[str, Any]:
    """Throughput in samples/s at ``batch`` from per-round wall times in **seconds**, one time per
    batch: each round gives ``batch / mean time``; ``samples_per_s`` is the median over rounds,
    ``min`` / ``max`` / ``spread_pct`` their range. Raises ValueError when nothing was timed."""
    per_round = [batch / float(np.mean(r)) for r in rounds if len(r)]
    if not per_round:
        raise ValueError("no timings")
    return {
        "batch": batch,
        "samples_per_s": float(np.median(per_round)),
        "min": float(min(per_round)),
        "max": float(max(per_round)),
        "spread_pct": spread_pct(per_round),
        "rounds": len(per_round),
        "iterations": int(sum(len(r) for r in rounds)),
    }


def rss_summary(values: Sequence[float]) -> dict[str, Any]:
    """Peak resident memory over the rounds' worker processes (MiB): ``median``, ``min``, ``max``.
    Raises ValueError when empty."""
    if not len(values):
        raise ValueError("no peak RSS values")
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()), "rounds": int(a.size)}


def ratio(reference: float | None, value: float | None, higher_is_better: bool) -> float | None:
    """How many times better ``value`` is than ``reference`` (> 1: better).

    Latencies (``higher_is_better=False``): ``reference / value``; throughput: ``value / reference``.
    ``None`` when either is missing or not positive.
    """
    if reference is None or value is None or reference <= 0 or value <= 0:
        return None
    return value / reference if higher_is_better else reference / value


def best_alternative(
    values: Mapping[str, float | None], higher_is_better: bool, candidate: str = CANDIDATE
) -> str | None:
    """The best variant other than ``candidate`` among those with a value (ties: the first);
    ``None`` when no alternative has one."""
    known = [(k, v) for k, v in values.items() if k != candidate and v is not None]
    if not known:
        return None
    pick = max if higher_is_better else min
    return pick(known, key=lambda kv: kv[1])[0]


def _get(d: Mapping[str, Any] | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(p)
    return d


def add_ratios(variants: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """Fill each variant's ``ratios`` in place and return the best alternatives.

    Ratios (> 1: better than the reference, ``None`` when unmeasured): ``p50_vs_eager``,
    ``p99_vs_eager``, ``throughput_vs_eager``, ``p50_vs_best_alt``, ``throughput_vs_best_alt``.
    The best alternative is the fastest variant that is not accelc's artifact (eager included),
    by batch-1 p50 and by throughput separately: ``{"latency": name, "throughput": name}``.
    """
    p50 = {k: _get(v, "latency", "p50_ms") for k, v in variants.items()}
    p99 = {k: _get(v, "latency", "p99_ms") for k, v in variants.items()}
    tput = {k: _get(v, "throughput", "samples_per_s") for k, v in variants.items()}
    best = {
        "latency": best_alternative(p50, higher_is_better=False),
        "throughput": best_alternative(tput, higher_is_better=True),
    }
    for k, v in variants.items():
        v["ratios"] = {
            "p50_vs_eager": ratio(p50.get(BASELINE), p50[k], False),
            "p99_vs_eager": ratio(p99.get(BASELINE), p99[k], False),
            "throughput_vs_eager": ratio(tput.get(BASELINE), tput[k], True),
            "p50_vs_best_alt": ratio(p50.get(best["latency"] or ""), p50[k], False),
            "throughput_vs_best_alt": ratio(tput.get(best["throughput"] or ""), tput[k], True),
        }
    return best


@dataclass(frozen=True)
class Target:
    """One of issue #4's targets: ``metric`` (a key of :func:`target_metrics`) ``op`` ``bound``."""

    metric: str
    op: str
    bound: float
    text: str


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}

#: Targets every recipe is held to.
COMMON_TARGETS: tuple[Target, ...] = (
    Target("verified", "==", 1.0, "the accelc build passes the recipe's own verification"),
    Target("warm_build_s", "<", 3.0, "warm rebuild (every pass cached) under 3 s wall, imports included"),
)
#: Issue #4's per-workload targets, set for the 2-core AVX-512 VNNI build machine at batch 1.
#: Keyed by recipe-name prefix (model and target): every CPU recipe of a model, whatever its
#: runtime, is held to the same targets (:func:`targets_for`).
TARGETS: dict[str, tuple[Target, ...]] = {
    "efficientnet_lite0_cpu_": (
        Target("speedup_vs_eager", ">=", 8.0, "batch-1 p50 at least 8x faster than eager FP32"),
        Target("p50_vs_quantize_static", "<=", 1.0, "batch-1 p50 no slower than the quantize_static one-liner"),
        Target("top1_agreement", ">=", 0.99, "top-1 agreement with eager FP32 at least 0.99"),
    ),
    "resnet18_cpu_": (
        Target("speedup_vs_eager", ">=", 5.0, "batch-1 p50 at least 5x faster than eager FP32"),
        Target("top1_agreement", ">=", 0.99, "top-1 agreement with eager FP32 at least 0.99"),
    ),
}


def target_metrics(recipe: Mapping[str, Any]) -> dict[str, float | None]:
    """The values the targets are checked against, from a recipe result (``None``: not measured).

    ``speedup_vs_eager`` (eager p50 / accelc p50), ``p50_vs_quantize_static`` (accelc p50 /
    quantize_static p50; <= 1 is no slower), ``top1_agreement`` (accelc vs eager FP32),
    ``warm_build_s`` and ``verified`` (1.0 / 0.0).
    """
    v = recipe.get("variants", {})
    acc, eager, qs = v.get(CANDIDATE), v.get(BASELINE), v.get("ort_int8_qs")
    acc_p50 = _get(acc, "latency", "p50_ms")
    qs_p50 = _get(qs, "latency", "p50_ms")
    verified = _get(acc, "verified")
    return {
        "speedup_vs_eager": ratio(_get(eager, "latency", "p50_ms"), acc_p50, False),
        "p50_vs_quantize_static": acc_p50 / qs_p50 if acc_p50 and qs_p50 else None,
        "top1_agreement": _get(acc, "quality", "top1_agreement"),
        "warm_build_s": _get(acc, "build", "warm_s"),
        "verified": None if verified is None else float(bool(verified)),
    }


def targets_for(recipe_name: str) -> tuple[Target, ...]:
    """The common targets plus those of the :data:`TARGETS` prefix ``recipe_name`` starts with."""
    own = next((t for prefix, t in TARGETS.items() if recipe_name.startswith(prefix)), ())
    return COMMON_TARGETS + own


def check_targets(recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target for this recipe (common ones first) with its measured ``value`` and ``met``
    (``None`` when the value was not measured)."""
    values = target_metrics(recipe)
    out = []
    for t in targets_for(recipe.get("recipe", "")):
        value = values.get(t.metric)
        met = None if value is None else _OPS[t.op](value, t.bound)
        out.append({"metric": t.metric, "op": t.op, "bound": t.bound, "text": t.text, "value": value, "met": met})
    return out


def finish_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Add ``best_alternative`` (by latency and by throughput) and ``targets`` to a recipe result
    whose variants are measured; fills every variant's ``ratios``. Returns the same dict."""
    recipe["best_alternative"] = add_ratios(recipe["variants"])
    recipe["targets"] = check_targets(recipe)
    return recipe


# --- formatting ---------------------------------------------------------------------------------

DASH = "–"


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    """``value`` with ``digits`` decimals and ``suffix``; a dash when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return f"{value:.{digits}f}{suffix}"


def _digits(x: float) -> int:
    return 2 if x < 10 else 1 if x < 100 else 0


def variant_label(name: str, v: Mapping[str, Any]) -> str:
    """The row label: the variant's short name, marked when accelc's artifact is unverified."""
    label = SHORT_LABELS.get(name, name)
    if v.get("verified") is False:
        label += " (UNVERIFIED)"
    if v.get("status") not in (None, "ok"):
        label += f" [{v['status']}]"
    return label


def _p50(v: Mapping[str, Any]) -> str:
    lat = v.get("latency")
    if not lat:
        return DASH
    d = _digits(lat["p50_ms"])
    return f"{lat['p50_ms']:.{d}f} ({lat['p50_min_ms']:.{d}f}–{lat['p50_max_ms']:.{d}f})"


def _p99(v: Mapping[str, Any]) -> str:
    lat = v.get("latency")
    return fmt(lat["p99_ms"], _digits(lat["p99_ms"])) if lat else DASH


def _tput(v: Mapping[str, Any]) -> str:
    t = v.get("throughput")
    return f"{t['samples_per_s']:.0f} ({t['min']:.0f}–{t['max']:.0f})" if t else DASH


def _build(v: Mapping[str, Any]) -> str:
    b = v.get("build") or {}
    if b.get("cold_s") is None and b.get("warm_s") is None:
        return DASH
    return f"{fmt(b.get('cold_s'), 1)} / {fmt(b.get('warm_s'), 2)}"


#: Column header -> formatter(variant result). Ratios print as "6.50×" (> 1: better than the reference).
COLUMNS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "bs1 p50 ms (range)": _p50,
    "bs1 p99 ms": _p99,
    "p50 ×eager": lambda v: fmt(_get(v, "ratios", "p50_vs_eager"), 2, "×"),
    "p50 ×best alt": lambda v: fmt(_get(v, "ratios", "p50_vs_best_alt"), 2, "×"),
    "bsN samples/s (range)": _tput,
    "tput ×eager": lambda v: fmt(_get(v, "ratios", "throughput_vs_eager"), 2, "×"),
    "tput ×best alt": lambda v: fmt(_get(v, "ratios", "throughput_vs_best_alt"), 2, "×"),
    "peak RSS MiB": lambda v: fmt(v.get("peak_rss_mib"), 0),
    "top-1 agree": lambda v: fmt(_get(v, "quality", "top1_agreement"), 3),
    "cosine": lambda v: fmt(_get(v, "quality", "cosine"), 4),
    "build s cold / warm": _build,
}
SPEED_COLUMNS = tuple(list(COLUMNS)[:7])
COST_COLUMNS = tuple(list(COLUMNS)[7:])
#: The speed columns split in two, so each terminal table fits 80 columns without breaking a number.
LATENCY_COLUMNS = SPEED_COLUMNS[:4]
THROUGHPUT_COLUMNS = SPEED_COLUMNS[4:]


def best_alternative_line(recipe: Mapping[str, Any]) -> str:
    """``"OpenVINO default (batch-1 latency), ORT FP32 (throughput)"``: the best alternatives by
    their row labels (a dash where none was measured)."""
    best = recipe.get("best_alternative") or {}
    label = {k: SHORT_LABELS.get(v, v) if v else DASH for k, v in best.items()}
    return f"{label.get('latency', DASH)} (batch-1 latency), {label.get('throughput', DASH)} (throughput)"


def table_rows(recipe: Mapping[str, Any], columns: Sequence[str] = tuple(COLUMNS)) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of a recipe's table: one row per variant in :data:`VARIANTS` order,
    the first column the variant label, then ``columns`` (keys of :data:`COLUMNS`; the batch
    size replaces ``N`` in headers)."""
    batch = recipe.get("batch", "N")
    header = ["variant"] + [c.replace("bsN", f"bs{batch}") for c in columns]
    rows = []
    for name in VARIANTS:
        v = recipe.get("variants", {}).get(name)
        if v is None:
            continue
        rows.append([variant_label(name, v)] + [COLUMNS[c](v) for c in columns])
    return header, rows


def target_lines(recipe: Mapping[str, Any]) -> list[str]:
    """One line per target: ``met`` / ``MISSED`` / ``not measured``, the value and the bound."""
    lines = []
    for t in recipe.get("targets", []):
        state = "not measured" if t["met"] is None else "met" if t["met"] else "MISSED"
        value = DASH if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"{state}: {t['text']} ({t['metric']} = {value}, needs {t['op']} {t['bound']:g})")
    return lines


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The README section: date, machine, threads and settings, then per recipe the table,
    the best alternatives, the targets, and notes (skips, unverified builds)."""
    m = doc.get("machine", {})
    s = doc.get("settings", {})
    out = [
        f"Measured {doc.get('date', '?')} on {m.get('cpu', '?')}"
        f"{' (' + m['cpu_family_model'] + ')' if m.get('cpu_family_model') else ''} ({m.get('cpus', '?')} CPUs"
        f"{', AVX-512 VNNI' if m.get('avx512_vnni') else ''}), "
        f"{doc.get('threads', '?')} threads for every variant; "
        f"torch {m.get('torch', '?')}, onnxruntime {m.get('onnxruntime', '?')}"
        f"{', openvino ' + m['openvino'] if m.get('openvino') else ''}. "
        f"Each variant timed alone in a process of its own, {s.get('rounds', '?')} rounds alternating the "
        f"processes (order rotated each round); per process {s.get('warmup', '?')} warm-up and "
        f"{s.get('iterations', '?')} timed batch-1 calls, then {s.get('throughput_warmup', '?')} warm-up and "
        f"{s.get('throughput_iterations', '?')} timed larger-batch calls"
        f"{' (quick smoke run: not for quoting)' if s.get('quick') else ''}.",
    ]
    out.append("")
    out.append(
        "Variants: " + "; ".join(f"{SHORT_LABELS[k]} = {LABELS[k]}" for k in VARIANTS) + ". "
        "Ratios are × better than the reference (> 1: faster); the best alternative is the fastest "
        "variant that is not accelc's. p50 is the median of the per-round medians, (range) their min–max."
    )
    if doc.get("conditions"):
        out += ["", f"Conditions: {doc['conditions'].rstrip('.')}."]
    for r in doc.get("recipes", []):
        out.append("")
        if r.get("status") != "ok":
            out.append(f"**{r.get('recipe')}**: {r.get('status')}: {r.get('reason')}")
            continue
        out.append(
            f"**{r['recipe']}** ({r.get('device', 'cpu')}, throughput at batch {r.get('batch')}, "
            f"{_get(r, 'variants', BASELINE, 'quality', 'samples') or '?'} validation samples)"
        )
        out.append("")
        out.append(markdown_table(*table_rows(r)))
        out.append("")
        out.append(f"Best alternative: {best_alternative_line(r)}.")
        out += [f"- {prefix}{line}" for prefix, line in finding_lines(r)]
    return "\n".join(out) + "\n"


def finding_lines(recipe: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(prefix, line)`` for everything said under a recipe's table, in order: target verdicts
    (no prefix), notes, agreement flips and profile findings. Shared by the terminal and Markdown output."""
    return (
        [("", line) for line in target_lines(recipe)]
        + [("note: ", n) for n in recipe.get("notes", [])]
        + [("flips: ", line) for line in quality_lines(recipe)]
        + [("noise floor: ", line) for line in noise_floor_line(recipe)]
        + [("profile: ", line) for line in profile_lines(recipe)]
    )


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def to_json(doc: Mapping[str, Any]) -> str:
    """The document as strict JSON (NaN/inf become ``null``, numpy scalars plain numbers)."""
    return json.dumps(_finite(doc), indent=2, allow_nan=False)


#: Operator types that hold a model's convolutions, per runtime (for the achieved GOP/s).
CONV_OPS = frozenset({
    "Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv", "aten::conv2d",  # ORT, torch
    "Convolution", "GroupConvolution", "FullyConnected",  # OpenVINO CPU plugin layers
})


def op_profile(per_node: Mapping[tuple[str, str], Sequence[float]], runs: int, top: int = 8) -> dict[str, Any]:
    """Per-operator-type time from per-node durations in **µs** (``{(op type, node): [one per run]}``).

    Returns, in ms per run: ``kernels_ms`` (mean over runs, summed over nodes) and
    ``kernels_min_ms``: the sum over nodes of each node's *fastest* run. Contention from other
    processes only ever adds time, so the sum of minimums is far less disturbed by brief load
    than the mean (on a machine kept saturated it still reads high). ``ops`` lists the ``top``
    operator types by mean time as ``{"op", "ms", "min_ms", "share_pct", "nodes"}``;
    ``conv_min_ms`` sums :data:`CONV_OPS`.
    """
    runs = max(1, runs)
    mean: dict[str, float] = {}
    low: dict[str, float] = {}
    nodes: dict[str, int] = {}
    for (op, _node), durs in per_node.items():
        if not len(durs):
            continue
        mean[op] = mean.get(op, 0.0) + float(sum(durs)) / runs / 1e3
        low[op] = low.get(op, 0.0) + float(min(durs)) / 1e3
        nodes[op] = nodes.get(op, 0) + 1
    total = sum(mean.values())
    ranked = sorted(mean, key=lambda op: -mean[op])[:top]
    return {
        "runs": runs,
        "kernels_ms": total,
        "kernels_min_ms": sum(low.values()),
        "conv_min_ms": sum(v for op, v in low.items() if op.split(" ", 1)[0] in CONV_OPS),
        "ops": [
            {
                "op": op,
                "ms": mean[op],
                "min_ms": low[op],
                "share_pct": 100.0 * mean[op] / total if total else 0.0,
                "nodes": nodes[op],
            }
            for op in ranked
        ],
    }


def ort_profile_summary(events: Sequence[Mapping[str, Any]], top: int = 8, skip_first: bool = True) -> dict[str, Any]:
    """:func:`op_profile` of an ONNX Runtime profile (``SessionOptions.enable_profiling``), plus
    ``run_ms`` (mean ``model_run``) and ``overhead_ms`` (run minus kernels: framework, copies,
    thread hand-offs). Node events are ``cat == "Node"`` named ``<node>_kernel_time`` with
    ``args.op_name``; ``ts``/``dur`` in µs. With ``skip_first`` the first ``model_run`` (a cold
    call) and the nodes inside it are left out. Times in ms per run."""
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: float(e.get("ts", 0)),
    )
    cutoff = -math.inf
    if skip_first and len(model_runs) > 1:
        first = model_runs.pop(0)
        cutoff = float(first.get("ts", 0)) + float(first.get("dur", 0))
    per_node: dict[tuple[str, str], list[float]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith("_kernel_time") and float(e.get("ts", 0)) > cutoff:
            op = str(_get(e, "args", "op_name") or "?")
            per_node.setdefault((op, name[: -len("_kernel_time")]), []).append(float(e.get("dur", 0)))
    out = op_profile(per_node, max(1, len(model_runs)), top)
    run_ms = float(np.mean([float(e.get("dur", 0)) for e in model_runs])) / 1e3 if model_runs else None
    out["run_ms"] = run_ms
    out["overhead_ms"] = None if run_ms is None else run_ms - out["kernels_ms"]
    return out


#: Kernel precisions OpenVINO's CPU plugin names at the end of a layer's ``exec_type``.
_OV_PRECISIONS = frozenset({"i8", "u8", "f32", "bf16", "f16", "fp32", "fp16", "i32"})


def ov_profile_summary(
    runs: Sequence[Sequence[Any]], run_ms: Sequence[float] | None = None, top: int = 8
) -> dict[str, Any]:
    """:func:`op_profile` of OpenVINO's per-layer counters: one ``InferRequest.profiling_info``
    list per run (a model compiled with ``PERF_COUNT``), each item with ``node_name``,
    ``node_type``, ``exec_type``, ``status`` and ``real_time`` (a ``timedelta``). Layers that did
    not run (``status`` other than ``EXECUTED``) are left out. The operator type is the layer type
    with the precision its kernel ran in, taken from the end of ``exec_type`` (e.g.
    ``brgconv_avx512_1x1_I8`` -> ``Convolution (i8)``), so INT8 and float layers show apart.
    ``run_ms``: wall time of each run (ms), which gives ``run_ms`` (mean) and ``overhead_ms``
    (run minus kernels). Times in ms per run."""
    per_node: dict[tuple[str, str], list[float]] = {}
    for infos in runs:
        for info in infos:
            if str(getattr(info, "status", "")).rsplit(".", 1)[-1] != "EXECUTED":
                continue
            precision = str(info.exec_type).rsplit("_", 1)[-1].lower()
            op = f"{info.node_type} ({precision})" if precision in _OV_PRECISIONS else info.node_type
            per_node.setdefault((op, info.node_name), []).append(info.real_time.total_seconds() * 1e6)
    out = op_profile(per_node, len(runs), top)
    out["run_ms"] = float(np.mean(run_ms)) if run_ms else None
    out["overhead_ms"] = None if out["run_ms"] is None else out["run_ms"] - out["kernels_ms"]
    return out


def conv_gops(macs: int | None, conv_ms: float | None) -> float | None:
    """Achieved convolution throughput in GOP/s (2 operations per multiply-accumulate) from the
    model's conv/linear MACs and the time its convolutions take (ms); ``None`` if unknown."""
    if not macs or not conv_ms:
        return None
    return 2.0 * macs / (conv_ms * 1e-3) / 1e9


def profile_lines(recipe: Mapping[str, Any]) -> list[str]:
    """Readable lines from a recipe's ``profile``, ``macs`` and ``gemm_peaks`` (``--profile``):
    per variant the mean run, kernel time (mean and sum of per-operator minimums), the
    convolutions' GOP/s at the minimums against the matching GEMM peak, and the top operators."""
    prof = recipe.get("profile") or {}
    peaks = recipe.get("gemm_peaks") or {}
    lines = []
    if recipe.get("macs"):
        lines.append(f"model: {recipe['macs'] / 1e9:.3f} GMAC per sample in conv/linear layers")
    if peaks:
        lines.append(
            f"GEMM peaks here (ONNX Runtime, best of repeats): INT8 {peaks.get('int8_gops', 0):.0f} GOP/s, "
            f"FP32 {peaks.get('fp32_gflops', 0):.0f} GFLOP/s"
        )
    for name in VARIANTS:
        p = prof.get(name)
        if not p:
            continue
        head = (
            f"{SHORT_LABELS[name]}: run {fmt(p.get('run_ms'))} ms (mean), kernels {fmt(p.get('kernels_ms'))} ms "
            f"(mean) / {fmt(p.get('kernels_min_ms'))} ms (sum of per-op minimums)"
        )
        gops = p.get("conv_gops")
        if gops:
            peak = peaks.get("int8_gops" if "int8" in name or name == CANDIDATE else "fp32_gflops")
            if any("(bf16)" in o["op"] or "(f16)" in o["op"] for o in p.get("ops", [])):
                peak = None  # half-precision kernels: neither measured peak applies
            head += f"; convolutions {gops:.0f} GOP/s" + (
                f" ({100 * gops / peak:.0f}% of the GEMM peak)" if peak else ""
            )
        ops = ", ".join(f"{o['op']} {o['min_ms']:.2f}" for o in p.get("ops", [])[:5])
        lines.append(f"{head}; top operators, ms (minimums): {ops}")
    return lines


def margin_stats(ref: np.ndarray, out: np.ndarray | None = None) -> dict[str, Any]:
    """How close the reference's decisions are: per row (sample) of ``ref`` ``(N, classes)`` the
    gap between its largest and second-largest logit. Returns ``median``, ``p10`` and ``min`` of
    the gap; with ``out`` (same shape) also ``flipped`` (rows whose arg-max differs) and
    ``max_flipped_gap``, the largest reference gap among them: when that is small next to the
    output error, the flips come from near-ties in the reference, not from a broken model."""
    r = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    top2 = np.sort(r, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    res: dict[str, Any] = {
        "median": float(np.median(gap)),
        "p10": float(np.percentile(gap, 10)),
        "min": float(gap.min()),
    }
    if out is not None:
        o = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
        flipped = r.argmax(1) != o.argmax(1)
        res["flipped"] = int(flipped.sum())
        res["max_flipped_gap"] = float(gap[flipped].max()) if flipped.any() else None
    return res


def pixel_step_noise(
    arrays: np.ndarray, std: Sequence[float], seed: int = 0, steps: float = 0.5
) -> np.ndarray:
    """``arrays`` ``(N, C, H, W)`` float32, normalised as ``(pixel / 255 - mean) / std``, moved by
    independent uniform noise of up to ``steps`` 8-bit pixel steps (``1 / (255 * std[c])`` in
    normalised units per channel ``c``). ``steps=0.5`` is the error of rounding a resized image to
    uint8, which many preprocessing pipelines do (e.g. a PIL resize of a uint8 image)."""
    lsb = 1.0 / (255.0 * np.asarray(std, np.float64))
    shape = (1, len(lsb)) + (1,) * (arrays.ndim - 2)
    noise = np.random.default_rng(seed).uniform(-steps, steps, arrays.shape) * lsb.reshape(shape)
    return (arrays + noise).astype(np.float32)


def noise_floor_line(recipe: Mapping[str, Any]) -> list[str]:
    """The reference against itself on inputs moved by half a pixel step (see :func:`pixel_step_noise`):
    the agreement that no deployment whose preprocessing rounds differently can be sure of."""
    nf = recipe.get("noise_floor")
    if not nf:
        return []
    return [
        f"eager FP32 against itself with each input moved by up to ±{nf['steps']} of an 8-bit pixel step "
        f"(as rounding a resized image to uint8 does): top-1 agreement {fmt(nf['top1_agreement'], 3)}, cosine "
        f"{fmt(nf['cosine'], 4)}, {nf['flipped']}/{nf['samples']} samples flip"
    ]


def quality_lines(recipe: Mapping[str, Any]) -> list[str]:
    """Why decisions flip, per INT8 variant with disagreements: how many samples flipped, the
    largest reference logit gap among them next to the reference's median gap, and the largest
    output error (see :func:`margin_stats`)."""
    ref = recipe.get("reference_margin")
    lines = []
    for name in VARIANTS:
        q = _get(recipe, "variants", name, "quality") or {}
        m = q.get("margin") or {}
        if not m.get("flipped") or not ref:
            continue
        lines.append(
            f"{SHORT_LABELS[name]}: {m['flipped']}/{q.get('samples')} samples flip; the largest reference "
            f"top-1/top-2 logit gap among them is {fmt(m.get('max_flipped_gap'), 3)} (median gap over all "
            f"samples {fmt(ref.get('median'), 3)}), max abs output error {fmt(q.get('max_abs_error'), 3)}"
        )
    return lines
