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


#: Rows of a sensitivity table shown in report.md (report.json has all of them).
SENSITIVITY_ROWS = 15


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
    lines += [f"| {head} | top-1 agreement | cosine (mean) | cosine (min) | max abs error | mean abs error | "
              "p50 ms (batch 1) | meets tolerances | kept |", "|---|---|---|---|---|---|---|---|---|"]
    for t in trials:
        if by_method:
            what = t["method"] + (f" ({t['percentile']:g})" if "percentile" in t else "")
        else:
            what = f"{len(t['fp32_nodes'])}: {_names(t['fp32_nodes'], 4)}" if t["fp32_nodes"] else "0 (full INT8)"
        lines.append(
            f"| {what} | {_fmt(t.get('top1_agreement'))} | {_fmt(t.get('cosine'))} | {_fmt(t.get('cosine_min'))} | "
            f"{_fmt(t.get('max_abs_error'))} | {_fmt(t.get('mean_abs_error'))} | {_fmt(t.get('p50_ms'))} | "
            f"{'yes' if t.get('passed') else 'no'} | {'**yes**' if t.get('kept') else ''} |"
        )
    lat = m.get("latency") if isinstance(m.get("latency"), dict) else {}
    where = f"batch {lat.get('batch', 1)}, {lat.get('threads')} threads, p50, measured side by side"
    if not by_method:
        lines += ["", f"Kept: {m.get('kept')}; nodes in float: {_names(m.get('fp32_nodes', []), 12)}. "
                  f"Latency ({where}): float {_fmt(lat.get('fp32_ms'))} ms, full INT8 {_fmt(lat.get('int8_ms'))} ms, "
                  f"kept {_fmt(lat.get('kept_ms'))} ms."]
    else:
        lines += ["", f"Kept: `{m.get('method')}`. Float model: {_fmt(lat.get('fp32_ms'))} ms ({where})."]
    sens = m.get("sensitivity")
    if isinstance(sens, list) and sens:
        info = m.get("sensitivity_data", {})
        lines += ["", f"### Sensitivity ({info.get('method', 'per node')}, {info.get('samples')} "
                  f"{info.get('set', '')} samples vs the {info.get('compared_with', 'float model')}; "
                  f"top {min(SENSITIVITY_ROWS, len(sens))} of {len(sens)})", "",
                  "| rank | node | op | cosine loss | cosine | top-1 agreement | mean abs error |",
                  "|---|---|---|---|---|---|---|"]
        for r in sens[:SENSITIVITY_ROWS]:
            lines.append(f"| {r['rank']} | `{r['node']}` | {r['op_type']} | {_fmt(r['cosine_loss'])} | "
                         f"{_fmt(r['cosine'])} | {_fmt(r['top1_agreement'])} | {_fmt(r['mean_abs_error'])} |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable report: summary, per-stage table, verification and benchmark tables."""
    lines = [
        f"# accelc build report: {report['recipe']['name']}",
        "",
        f"- status: **{report['status']}**",
        f"- target: `{report['target']}` (runtime `{report['runtime']}`, precision `{report['precision']}`)",
        f"- final artifact: `{report['final_artifact']}`"
        + (f" (sha256 `{report['final_digest'][:16]}`)" if report["final_digest"] else ""),
        f"- host: {report['host'].get('cpu')} ({report['host'].get('cpu_count')} CPUs)",
    ]
    if report["error"]:
        lines += ["", f"> **{report['error']['type']}**: {report['error']['message']}"]
    lines += ["", "## Stages", "", "| # | stage | pass | status | cached | seconds | kind | key |",
              "|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(report["stages"], 1):
        lines.append(
            f"| {i} | `{s['node']}` | {s['pass']} | {s['status']} | {'yes' if s['cached'] else 'no'} | "
            f"{s['seconds']:.2f} | {s['artifact']['kind']} | `{s['artifact']['key'][:12]}` |"
        )
    ver = [s for s in report["stages"] if s["pass"] == "verify" and s["metrics"]]
    if ver:
        lines += ["", "## Verification against the source model", "",
                  "| stage | samples | top-1 agreement | cosine (mean) | cosine (min) | max abs error | "
                  "mean abs error | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in ver:
            m = s["metrics"]
            lines.append(
                f"| `{s['node']}` | {m.get('samples')} | {_fmt(m.get('top1_agreement'))} | {_fmt(m.get('cosine'))} | "
                f"{_fmt(m.get('cosine_min'))} | {_fmt(m.get('max_abs_error'))} | {_fmt(m.get('mean_abs_error'))} | "
                f"{s['status']} |"
            )
        for s in ver:  # embeddings and hidden states: neighbour agreement, and a reference that cannot judge
            m = s["metrics"]
            if "neighbor_recall" in m:
                lines.append(f"\n`{s['node']}` ({m.get('output_kind')}): neighbour recall@{m.get('recall_k')} "
                             f"{_fmt(m['neighbor_recall'])}")
            if m.get("degenerate_reference"):
                lines.append(f"\n**`{s['node']}`: the reference is degenerate**: {m['degenerate_reference']}")
    for s in report["stages"]:
        lines += _trials_markdown(s)
    bench = [s for s in report["stages"] if s["pass"] == "benchmark" and s["metrics"]]
    for s in bench:
        m = s["metrics"]
        lines += ["", f"## Benchmark (`{m.get('artifact_kind')}`, {m.get('threads')} threads, {m.get('device')}, "
                  f"{m.get('warmup')} warm-up + {m.get('iterations')} timed runs"
                  f"{', cached' if s['cached'] else ''})", "",
                  "| batch | p50 ms | p95 ms | p99 ms | throughput (samples/s) |", "|---|---|---|---|---|"]
        for bs, b in m.get("batch", {}).items():
            lines.append(
                f"| {bs} | {b['p50_ms']:.3f} | {b['p95_ms']:.3f} | {b['p99_ms']:.3f} | {b['throughput']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, report: dict[str, Any], lock: dict[str, Any]) -> None:
    write_atomic(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    write_atomic(out_dir / "report.md", render_markdown(report))
    write_atomic(out_dir / LOCK_NAME, json.dumps(lock, indent=2, sort_keys=True, default=str))


def read_lock(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
