"""Build outputs: ``report.json``, ``report.md`` and the lock file ``accelc.lock``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .artifacts import sha256_file
from .environment import fingerprint
from .executor import BuildResult, Executor

LOCK_NAME = "accelc.lock"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and ``os.replace`` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_report(ex: Executor, result: BuildResult, final_files: list[str]) -> dict[str, Any]:
    """The ``report.json`` document. Stages are in execution order; plugins' ``accelc_report_sections``
    are added under ``sections`` (left out when no plugin returns one).

    Raises:
        PluginError: a plugin's report-section hook failed or clashed with another's.
    """
    g = ex.graph
    r = g.recipe
    report = {
        "recipe": {"name": r.name, "file": str(r.file), "sha256": sha256_file(r.file)},
        "target": g.target.name,
        "runtime": g.runtime,
        "precision": r.precision,
        "status": "ok" if result.failure is None else "failed",
        "error": None
        if result.failure is None
        else {"type": type(result.failure).__name__, "message": str(result.failure)},
        # the file a runtime loads (an IR's .xml, not its .bin); the other payload files ride along
        "final_artifact": (result.final.main if result.final.main in final_files else final_files[0])
        if result.final is not None and final_files
        else None,
        "final_files": final_files,
        "final_digest": result.final.digest if result.final else None,
        "final_kind": result.final.kind if result.final else None,
        "stages": [
            {
                "node": s.node,
                "pass": s.pass_name,
                "status": s.status,
                "cached": s.cached,
                "seconds": round(s.seconds, 4),
                "artifact": {"kind": s.kind, "key": s.key, "digest": s.digest},
                "metrics": s.metrics,
                **({"error": s.error} if s.error else {}),
                **({"ran_on": s.ran_on} if getattr(s, "ran_on", None) else {}),
            }
            for s in result.stages
        ],
        "host": ex.host.describe(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    report_sections = getattr(ex.registry, "report_sections", None)
    sections = report_sections(report, result.stages) if report_sections is not None else {}
    if sections:
        report["sections"] = sections
    return report


def build_lock(ex: Executor, result: BuildResult, report: dict[str, Any]) -> dict[str, Any]:
    """The lock file: every node's key, digest and key material, the package versions and the host."""
    digests = {s.node: s.digest for s in result.stages}
    return {
        "recipe": report["recipe"],
        "target": report["target"],
        "runtime": report["runtime"],
        "precision": report["precision"],
        "final": {"node": ex.graph.final, "files": report["final_files"], "digest": report["final_digest"]},
        "nodes": [
            {
                "id": n.id,
                "pass": n.pass_name,
                "plugin": ex.registry.plugin_of("passes", n.pass_name),
                "key": ex.key(n.id),
                "digest": digests.get(n.id),
                "material": ex._keys[n.id][1],
            }
            for n in ex.graph.nodes
        ],
        "environment": fingerprint(),
        "host": ex.host.describe(),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


#: Columns of a trials table, each shown when some trial has it (``(metric key, header)``).
TRIAL_COLUMNS = (
    ("top1_agreement", "top-1 agreement"),
    ("flip_margin", "flip margin"),
    ("cosine", "cosine (mean)"),
    ("cosine_min", "cosine (min)"),
    ("neighbor_recall", "neighbour recall"),
    ("max_abs_error", "max abs error"),
    ("mean_abs_error", "mean abs error"),
    ("p50_ms", "p50 ms (batch 1)"),
)

#: Columns of the verification table, each shown when some verified stage has it (neighbour
#: recall gets a line of its own, which names its k).
VERIFY_COLUMNS = tuple((k, h) for k, h in TRIAL_COLUMNS if k not in ("p50_ms", "neighbor_recall"))

#: Rows of a sensitivity table shown in report.md (report.json has all of them).
SENSITIVITY_ROWS = 15


def _measured(columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The ``(metric key, header)`` columns that some row has a value for."""
    return [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]


def _header(cells: list[str]) -> list[str]:
    """A Markdown table's header and rule lines."""
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]


def _names(nodes: list[str], limit: int = 6) -> str:
    if not nodes:
        return "none"
    shown = ", ".join(f"`{n}`" for n in nodes[:limit])
    return shown + (f" (+{len(nodes) - limit} more)" if len(nodes) > limit else "")


def _trials_markdown(stage: dict[str, Any]) -> list[str]:
    """Tables for a stage that tried several configurations (``metrics.trials``, e.g. calibrate
    ``method: auto`` and quantize with tolerances) and its ``sensitivity`` ranking, if any."""
    m = stage.get("metrics") or {}
    trials = m.get("trials")
    if not isinstance(trials, list) or not trials:
        return []
    by_method = "method" in trials[0]
    head = "method" if by_method else "nodes kept in float"
    lines = ["", f"## Trials of `{stage['node']}`", ""]
    if m.get("tolerances"):
        lines += [f"Tolerances: {', '.join(f'{k} {v:g}' for k, v in m['tolerances'].items())}.", ""]
    shown = _measured(TRIAL_COLUMNS, trials)
    lines += _header([head, *(h for _, h in shown), "meets tolerances", "kept"])
    for t in trials:
        if by_method:
            what = t["method"] + (f" ({t['percentile']:g})" if "percentile" in t else "")
        else:
            what = f"{len(t['fp32_nodes'])}: {_names(t['fp32_nodes'], 4)}" if t["fp32_nodes"] else "0 (full INT8)"
        cells = [what, *(_fmt(t.get(k)) for k, _ in shown), "yes" if t.get("passed") else "no",
                 "**yes**" if t.get("kept") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lat = m.get("latency") if isinstance(m.get("latency"), dict) else {}
    where = f"batch {lat.get('batch', 1)}, {lat.get('threads')} threads, p50, each model timed alone"
    if not by_method:
        timed = (f" Latency ({where}): float {_fmt(lat.get('fp32_ms'))} ms, full INT8 {_fmt(lat.get('int8_ms'))} ms, "
                 f"kept {_fmt(lat.get('kept_ms'))} ms." if lat else "")
        lines += ["", f"Kept: {m.get('kept')}; nodes in float: {_names(m.get('fp32_nodes', []), 12)}.{timed}"]
        oc = m.get("outlier_channels") if isinstance(m.get("outlier_channels"), dict) else {}
        if oc.get("decomposed"):
            lines += ["", f"Outlier channels (in every trial): {oc['channels']} activation channel(s) of "
                      f"{oc['decomposed']} of {oc['of']} MatMuls multiply in float beside the INT8 MatMul "
                      f"(absolute maximum above {oc['threshold']:g}x the median channel's on {oc['samples']} "
                      "calibration samples"
                      + (f"; split where the MatMul's input range shrinks at least {oc['min_gain']:g}x"
                         if oc.get("min_gain", 1) > 1 else "") + ")."]
    elif lat:
        lines += ["", f"Kept: `{m.get('method')}`. Float model: {_fmt(lat.get('fp32_ms'))} ms ({where})."]
    else:
        lines += ["", f"Kept: `{m.get('method')}`."]
    sens = m.get("sensitivity")
    if isinstance(sens, list) and sens:
        info = m.get("sensitivity_data", {})
        lines += ["", f"### Sensitivity ({info.get('method', 'per node')}, {info.get('samples')} "
                  f"{info.get('set', '')} samples vs the {info.get('compared_with', 'float model')}; "
                  f"top {min(SENSITIVITY_ROWS, len(sens))} of {len(sens)})", "",
                  ]
        if "added_nsr" in sens[0]:
            lines += ["| rank | node | op | added noise (NSR) | output SQNR dB | input SQNR dB |",
                      "|---|---|---|---|---|---|"]
            for r in sens[:SENSITIVITY_ROWS]:
                lines.append(f"| {r['rank']} | `{r['node']}` | {r['op_type']} | {_fmt(r['added_nsr'])} | "
                             f"{_fmt(r['sqnr_db'])} | {_fmt(r['input_sqnr_db'])} |")
        else:
            lines += ["| rank | node | op | cosine loss | cosine | top-1 agreement | mean abs error |",
                      "|---|---|---|---|---|---|---|"]
            for r in sens[:SENSITIVITY_ROWS]:
                lines.append(f"| {r['rank']} | `{r['node']}` | {r['op_type']} | {_fmt(r['cosine_loss'])} | "
                             f"{_fmt(r['cosine'])} | {_fmt(r['top1_agreement'])} | {_fmt(r['mean_abs_error'])} |")
    return lines


def _final_bench(report: dict[str, Any]) -> dict[str, Any] | None:
    bench = [s for s in report["stages"] if s["pass"] == "benchmark" and s["metrics"]]
    return bench[-1]["metrics"] if bench else None


def speedups(report: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 p50 of the artifact and its speed-ups, where measured: ``{"p50_ms", "source_ms",
    "over_source", "float_ms", "over_float", "float_from"}``. The benchmark's baselines (each timed in
    its own process, like the artifact) come first; else the accuracy search's trial latencies."""
    out: dict[str, Any] = {}
    m = _final_bench(report)
    b1 = ((m or {}).get("batch") or {}).get("1")
    if b1:
        out["p50_ms"] = b1["p50_ms"]
        for name, key in (("source", "source_ms"), ("float", "float_ms")):
            base = (m.get("baselines") or {}).get(name) or {}
            if base.get("p50_ms"):
                out[key] = base["p50_ms"]
                out[f"over_{name}"] = base["p50_ms"] / b1["p50_ms"]
        if "float_ms" in out:
            out["float_from"] = "benchmark"
    if "float_ms" not in out:
        from .plots import search_stage

        st = search_stage(report)
        lat = (st or {}).get("metrics", {}).get("latency") or {}
        kept = lat.get("kept_ms")
        if lat.get("fp32_ms") and kept:
            out.update(float_ms=lat["fp32_ms"], over_float=lat["fp32_ms"] / kept, float_from=st["node"],
                       search_kept_ms=kept)
    return out


def _times(ratio: float) -> str:
    """``2.31`` -> ``**2.31x faster**``; ``0.5`` -> ``**2.00x slower**``."""
    return f"**{ratio:.2f}x faster**" if ratio >= 1 else f"**{1 / ratio:.2f}x slower**"


def _warnings(report: dict[str, Any]) -> list[str]:
    w: list[str] = []
    if report["error"]:
        w.append(f"**build failed**: {report['error']['type']}: {report['error']['message']}")
    for s in report["stages"]:
        if s["status"] not in ("ok",):
            w.append(f"stage `{s['node']}` {s['status']}" + (f": {s['error']}" if s.get("error") else ""))
        m = s.get("metrics") or {}
        if s["pass"] == "quantize" and m.get("fp32_nodes"):
            w.append(f"{len(m['fp32_nodes'])} node(s) kept in float to hold the tolerances: {_names(m['fp32_nodes'])}")
        if m.get("slower_than_float"):
            w.append(f"`{s['node']}`: {m['slower_than_float']}")
    m = _final_bench(report) or {}
    for bs, b in (m.get("batch") or {}).items():
        if b.get("p50_ms") and b["p99_ms"] > 3 * b["p50_ms"]:
            w.append(f"batch {bs}: p99 {b['p99_ms']:.3g} ms is {b['p99_ms'] / b['p50_ms']:.1f}x p50 "
                     "(a noisy host: other processes, CPU frequency); see the latency distribution")
    sp = speedups(report)
    if sp.get("float_from") == "benchmark" and sp["over_float"] < 1:
        w.append(f"the artifact is slower than the FP32 ONNX model at batch 1 ({sp['p50_ms']:.3g} ms against "
                 f"{sp['float_ms']:.3g} ms, each timed in its own process): set verify.min_speedup to fail such builds")
    for name, base in (m.get("baselines") or {}).items():
        if base.get("error"):
            w.append(f"baseline `{name}` could not be timed: {base['error']}")
    if m.get("skipped_batch_sizes"):
        w.append(f"batch sizes outside the input's dynamic range were not benchmarked: {m['skipped_batch_sizes']}")
    return w


def build_time_markdown(report: dict[str, Any]) -> list[str]:
    """Where the build's time went: each stage that ran (not cached), its seconds and share of the
    stages' total, and the phases a pass timed itself (``timing_s``: calibration collection,
    trials, sensitivity, latency), largest first."""
    ran = [s for s in report["stages"] if not s["cached"] and s["seconds"] > 0]
    if not ran:
        return ["", "## Build time", "", "Every stage came from the cache."]
    total = sum(s["seconds"] for s in report["stages"])
    lines = ["", "## Build time", "",
             f"{total:.1f} s in the stages ({len(ran)} run, {len(report['stages']) - len(ran)} cached), "
             "largest first:", "", "| stage | seconds | share | phases (s) |", "|---|---|---|---|"]
    for st in sorted(ran, key=lambda s: -s["seconds"]):
        phases = (st.get("metrics") or {}).get("timing_s") or {}
        text = ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]))
        lines.append(f"| `{st['node']}` | {st['seconds']:.2f} | {st['seconds'] / total:.0%} | {text} |")
    return lines


def headline(report: dict[str, Any]) -> str:
    """One line: precision, batch-1 speed-ups over the source model and the FP32 ONNX model, agreement.

    ``INT8 · 6.9x faster than the source model (eager PyTorch), 1.4x faster than FP32 ONNX
    (batch 1, p50) · top-1 agreement 0.958, cosine 0.998 (verify[quantize])``; parts that were not
    measured say so."""
    prec = {"int8": "INT8", "fp16": "FP16", "fp32": "FP32"}.get(report["precision"], report["precision"])
    sp = speedups(report)
    speed = []
    def times(r: float) -> str:
        return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"

    if "over_source" in sp:
        speed.append(f"{times(sp['over_source'])} than the source model (eager PyTorch)")
    if "over_float" in sp:
        speed.append(f"{times(sp['over_float'])} than FP32 ONNX")
    parts = [prec, (", ".join(speed) + " (batch 1, p50)") if speed else "speed not measured"]
    ver = [s for s in report["stages"] if s["pass"] == "verify" and s["metrics"]]
    if ver:
        m = ver[-1]["metrics"]
        agree = [f"top-1 agreement {m['top1_agreement']:.3f}" if m.get("top1_agreement") is not None else "",
                 f"cosine {m['cosine']:.4f}" if m.get("cosine") is not None else "",
                 f"recall@{m.get('recall_k')} {m['neighbor_recall']:.3f}" if m.get("neighbor_recall") is not None
                 else ""]
        parts.append(", ".join(a for a in agree if a) + f" ({ver[-1]['node']})")
    else:
        parts.append("agreement not verified")
    return " · ".join(parts)


def summary_markdown(report: dict[str, Any]) -> list[str]:
    """The lines a person reads first: what was built, how much faster, whether accuracy held, warnings."""
    prec = {"int8": "INT8", "fp16": "FP16", "fp32": "FP32"}.get(report["precision"], report["precision"])
    what = (f"{prec} `{report['final_artifact']}` ({report['final_kind']})" if report["final_artifact"]
            else f"{prec}, nothing deployed")
    lines = [f"**{'Built' if report['status'] == 'ok' else 'Failed'}**: {what} for target `{report['target']}` "
             f"on `{report['runtime']}`."]
    sp = speedups(report)
    if "p50_ms" in sp:
        parts = [f"**Speed** (batch 1, p50): {sp['p50_ms']:.3g} ms"]
        if "over_source" in sp:
            parts.append(f"{_times(sp['over_source'])} than the source model in eager PyTorch "
                         f"({sp['source_ms']:.3g} ms)")
        if "over_float" in sp and sp.get("float_from") == "benchmark":
            parts.append(f"{_times(sp['over_float'])} than FP32 ONNX ({sp['float_ms']:.3g} ms)")
        lines.append("; ".join(parts) + ".")
    if "over_float" in sp and sp.get("float_from") != "benchmark":
        lines.append(f"**Against FP32 ONNX**: {_times(sp['over_float'])} ({sp['float_ms']:.3g} ms -> "
                     f"{sp['search_kept_ms']:.3g} ms, each timed alone by `{sp['float_from']}`).")
    if "p50_ms" not in sp and "over_float" not in sp:
        lines.append("**Speed**: not measured (no benchmark stage ran).")
    ver = [s for s in report["stages"] if s["pass"] == "verify" and s["metrics"]]
    if ver:
        last = ver[-1]
        m = last["metrics"]
        held = "held" if last["status"] == "ok" else "**not held**"
        acc = [f"top-1 agreement {_fmt(m['top1_agreement'])}" if m.get("top1_agreement") is not None else None,
               f"cosine {_fmt(m.get('cosine'))}" if m.get("cosine") is not None else None,
               f"task accuracy {_fmt(m['accuracy'])}" if m.get("accuracy") is not None else None]
        lines.append(f"**Accuracy {held}** at `{last['node']}`: " + ", ".join(a for a in acc if a)
                     + f" against the source model on {m.get('samples')} validation samples.")
    else:
        lines.append("**Accuracy**: not verified (add data.validation to the recipe).")
    warns = _warnings(report)
    lines.append("**Warnings**: " + ("none." if not warns else ""))
    lines = [f"- {line}" for line in lines]
    lines += [f"  - {w}" for w in warns]
    return lines


def render_markdown(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """A human-readable report: a summary read in 30 seconds, then accuracy (verification, trials,
    sensitivity) and speed (benchmark), with the plots in ``plots`` (``{name: file in the out dir}``)
    embedded, then the stage/cache table and the build's details."""
    plots = plots or {}
    lines = [f"# accelc build report: {report['recipe']['name']}", "", f"**{headline(report)}**", "", "## Summary", "",
             *summary_markdown(report)]
    lines += ["", "## Accuracy"]
    ver = [s for s in report["stages"] if s["pass"] == "verify" and s["metrics"]]
    if ver:
        cols = _measured(VERIFY_COLUMNS, [v["metrics"] for v in ver])
        lines += ["", "Verification against the source model:", "",
                  *_header(["stage", "samples", *(h for _, h in cols), "status"])]
        for s in ver:
            m = s["metrics"]
            cells = [f"`{s['node']}`", str(m.get("samples")), *(_fmt(m.get(k)) for k, _ in cols), s["status"]]
            lines.append("| " + " | ".join(cells) + " |")
        for s in ver:  # embeddings and hidden states: neighbour agreement, and a reference that cannot judge
            m = s["metrics"]
            if "neighbor_recall" in m:
                lines.append(f"\n`{s['node']}` ({m.get('output_kind')}): neighbour recall@{m.get('recall_k')} "
                             f"{_fmt(m['neighbor_recall'])}")
            if m.get("degenerate_reference"):
                lines.append(f"\n**`{s['node']}`: the reference is degenerate**: {m['degenerate_reference']}")
    else:
        lines += ["", "No stage was verified."]
    if "accuracy_latency" in plots:
        lines += ["", f"![accuracy against latency over the trials, the kept one starred]({plots['accuracy_latency']})"]
    for s in report["stages"]:
        lines += _trials_markdown(s)
    if "sensitivity" in plots:
        lines += ["", f"![sensitivity ranking]({plots['sensitivity']})"]
    lines += ["", "## Speed"]
    bench = [s for s in report["stages"] if s["pass"] == "benchmark" and s["metrics"]]
    if not bench:
        lines += ["", "Not benchmarked."]
    for s in bench:
        m = s["metrics"]
        lines += ["", f"Benchmark (`{m.get('artifact_kind')}`, {m.get('threads')} threads, {m.get('device')}, "
                  f"{m.get('warmup')} warm-up + {m.get('iterations')} timed runs"
                  f"{', cached' if s['cached'] else ''}):", "",
                  "| batch | p50 ms | p95 ms | p99 ms | throughput (samples/s) |", "|---|---|---|---|---|"]
        for bs, b in m.get("batch", {}).items():
            lines.append(
                f"| {bs} | {b['p50_ms']:.3f} | {b['p95_ms']:.3f} | {b['p99_ms']:.3f} | {b['throughput']:.1f} |"
            )
        base = {k: v for k, v in (m.get("baselines") or {}).items() if v.get("p50_ms")}
        if base:
            lines += ["", "Baselines, each timed alone in its own process like the artifact (batch 1):", "",
                      "| model | kind | p50 ms | p99 ms | artifact speed-up |", "|---|---|---|---|---|"]
            b1 = (m.get("batch") or {}).get("1", {})
            for name, v in base.items():
                label = {"source": "source model (eager PyTorch)", "float": "FP32 ONNX"}.get(name, name)
                up = f"{v['p50_ms'] / b1['p50_ms']:.2f}x" if b1.get("p50_ms") else "-"
                lines.append(f"| {label} | {v['kind']} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {up} |")
    if "latency_batch1" in plots:
        lines += ["", f"![batch-1 latency distribution]({plots['latency_batch1']})"]
    lines += build_time_markdown(report)
    lines += ["", "## Stages", "", "| # | stage | pass | status | cached | seconds | kind | key |",
              "|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(report["stages"], 1):
        lines.append(
            f"| {i} | `{s['node']}` | {s['pass']} | {s['status']} | {'yes' if s['cached'] else 'no'} | "
            f"{s['seconds']:.2f} | {s['artifact']['kind']} | `{s['artifact']['key'][:12]}` |"
        )
    lines += [
        "",
        "## Build",
        "",
        f"- status: **{report['status']}**",
        f"- target: `{report['target']}` (runtime `{report['runtime']}`, precision `{report['precision']}`)",
        f"- final artifact: `{report['final_artifact']}`"
        + (f" (sha256 `{report['final_digest'][:16]}`)" if report["final_digest"] else ""),
        f"- host: {report['host'].get('cpu')} ({report['host'].get('cpu_count')} CPUs)",
    ]
    if report["error"]:
        lines += ["", f"> **{report['error']['type']}**: {report['error']['message']}"]
    return "\n".join(lines) + "\n"


def write_outputs(
    out_dir: Path, report: dict[str, Any], lock: dict[str, Any], deploy: dict[str, Any] | None = None,
    previous: Path | None = None,
) -> None:
    """Write ``report.json``, the plots, ``report.md``, ``deploy.json`` (removed when ``deploy`` is
    ``None``: nothing was deployed) and, last, the lock file, each atomically. ``previous``: the
    generation this one replaces, whose plots are reused when drawn from the same data."""
    from .deploy import DEPLOY_NAME
    from .plots import write_plots

    write_atomic(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    plots = write_plots(out_dir, report, previous)
    write_atomic(out_dir / "report.md", render_markdown(report, plots))
    if deploy is not None:
        write_atomic(out_dir / DEPLOY_NAME, json.dumps(deploy, indent=2, default=str))
    else:
        (out_dir / DEPLOY_NAME).unlink(missing_ok=True)
    write_atomic(out_dir / LOCK_NAME, json.dumps(lock, indent=2, sort_keys=True, default=str))


def read_lock(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
