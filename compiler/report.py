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
    """The ``report.json`` document. Stages are in execution order."""
    g = ex.graph
    r = g.recipe
    return {
        "recipe": {"name": r.name, "file": str(r.file), "sha256": sha256_file(r.file)},
        "target": g.target.name,
        "runtime": g.runtime,
        "precision": r.precision,
        "status": "ok" if result.failure is None else "failed",
        "error": None if result.failure is None else {"type": type(result.failure).__name__, "message": str(result.failure)},
        "final_artifact": final_files[0] if final_files else None,
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
            }
            for s in result.stages
        ],
        "host": ex.host.describe(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable report: summary, per-stage table, verification and benchmark tables."""
    lines = [
        f"# accelc build report: {report['recipe']['name']}",
        "",
        f"- status: **{report['status']}**",
        f"- target: `{report['target']}` (runtime `{report['runtime']}`, precision `{report['precision']}`)",
        f"- final artifact: `{report['final_artifact']}`" + (f" (sha256 `{report['final_digest'][:16]}`)" if report["final_digest"] else ""),
        f"- host: {report['host'].get('cpu')} ({report['host'].get('cpu_count')} CPUs)",
    ]
    if report["error"]:
        lines += ["", f"> **{report['error']['type']}**: {report['error']['message']}"]
    lines += ["", "## Stages", "", "| # | stage | pass | status | cached | seconds | kind | key |", "|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(report["stages"], 1):
        lines.append(
            f"| {i} | `{s['node']}` | {s['pass']} | {s['status']} | {'yes' if s['cached'] else 'no'} | "
            f"{s['seconds']:.2f} | {s['artifact']['kind']} | `{s['artifact']['key'][:12]}` |"
        )
    ver = [s for s in report["stages"] if s["pass"] == "verify" and s["metrics"]]
    if ver:
        lines += ["", "## Verification against the source model", "",
                  "| stage | samples | top-1 agreement | cosine (mean) | cosine (min) | max abs error | mean abs error | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in ver:
            m = s["metrics"]
            lines.append(
                f"| `{s['node']}` | {m.get('samples')} | {_fmt(m.get('top1_agreement'))} | {_fmt(m.get('cosine'))} | "
                f"{_fmt(m.get('cosine_min'))} | {_fmt(m.get('max_abs_error'))} | {_fmt(m.get('mean_abs_error'))} | {s['status']} |"
            )
    bench = [s for s in report["stages"] if s["pass"] == "benchmark" and s["metrics"]]
    for s in bench:
        m = s["metrics"]
        lines += ["", f"## Benchmark (`{m.get('artifact_kind')}`, {m.get('threads')} threads, {m.get('device')}, "
                  f"{m.get('warmup')} warm-up + {m.get('iterations')} timed runs{', cached' if s['cached'] else ''})", "",
                  "| batch | p50 ms | p95 ms | p99 ms | throughput (samples/s) |", "|---|---|---|---|---|"]
        for bs, b in m.get("batch", {}).items():
            lines.append(f"| {bs} | {b['p50_ms']:.3f} | {b['p95_ms']:.3f} | {b['p99_ms']:.3f} | {b['throughput']:.1f} |")
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
