"""The report's plots (matplotlib, Agg backend, PNG), drawn from ``report.json`` alone.

- ``accuracy_latency.png``: every trial of an accuracy search (calibrate ``method: auto``,
  quantize ``fallback``) as accuracy (top-1 agreement with the source model, else cosine) against
  p50 latency at batch 1, the kept one marked, the float model as a reference line;
- ``sensitivity.png``: the per-node sensitivity ranking (the noise each node adds, or the cosine
  loss with only that node quantized), most sensitive on top;
- ``latency_batch1.png``: the distribution of the benchmark's per-iteration batch-1 latencies,
  with p50 and p99 marked.

A plot whose data the build did not produce is left out; :func:`write_plots` returns the ones written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: File names of every plot a build may write into its out dir (stale ones are removed).
PLOT_FILES = ("accuracy_latency.png", "sensitivity.png", "latency_batch1.png")
#: Nodes shown in the sensitivity plot.
SENSITIVITY_BARS = 20


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def search_stage(report: dict[str, Any]) -> dict[str, Any] | None:
    """The stage whose accuracy search tried the most configurations with latencies (the later one
    on a tie: quantize's fallback trials over calibrate's methods), or ``None``."""
    found, most = None, 0
    for s in report.get("stages", []):
        trials = (s.get("metrics") or {}).get("trials")
        n = sum(t.get("p50_ms") is not None for t in trials) if isinstance(trials, list) else 0
        if n and n >= most:
            found, most = s, n
    return found


def _plotted_metric(trials: list[dict[str, Any]], tolerances: dict[str, float]) -> str:
    """``cosine`` or ``top1_agreement``: the one whose tolerance some trial missed (the one that decided
    the search), else top-1 where every trial has it, else cosine."""
    for name in ("cosine", "top1_agreement"):
        bound = tolerances.get(name)
        values = [t.get(name) for t in trials]
        if bound is not None and all(v is not None for v in values) and any(v < bound for v in values):
            return name
    return "top1_agreement" if all(t.get("top1_agreement") is not None for t in trials) else "cosine"


def _accuracy_latency(report: dict[str, Any], path: Path) -> bool:
    stage = search_stage(report)
    if stage is None:
        return False
    m = stage["metrics"]
    trials = [t for t in m["trials"] if t.get("p50_ms") is not None]
    metric = _plotted_metric(trials, m.get("tolerances") or {})
    label = {"top1_agreement": "top-1 agreement with the source model", "cosine": "cosine similarity (mean)"}[metric]
    fig = _figure()
    ax = fig.add_subplot()
    for idx, t in enumerate(trials):
        x, y = t["p50_ms"], t.get(metric)
        if y is None:
            continue
        if "method" in t:
            name = t["method"]
        else:
            name = f"{len(t.get('fp32_nodes', []))} in float" if t.get("fp32_nodes") else "full INT8"
        color = "tab:green" if t.get("passed") else "tab:red"
        ax.scatter([x], [y], s=140 if t.get("kept") else 45, c=color, marker="*" if t.get("kept") else "o",
                   edgecolors="black" if t.get("kept") else "none", zorder=3)
        # staggered labels: trials often tie on accuracy and land on one another
        ax.annotate(name + (" (kept)" if t.get("kept") else ""), (x, y), textcoords="offset points",
                    xytext=(6, 4 - 12 * (idx % 3)), fontsize=8)
    lat = m.get("latency") if isinstance(m.get("latency"), dict) else {}
    if lat.get("fp32_ms"):
        ax.axvline(lat["fp32_ms"], color="gray", linestyle="--", linewidth=1)
        ax.annotate("float model", (lat["fp32_ms"], ax.get_ylim()[0]), textcoords="offset points", xytext=(3, 4),
                    fontsize=8, color="gray")
    tol = (m.get("tolerances") or {}).get(metric)
    if tol is not None:
        ax.axhline(tol, color="tab:orange", linestyle=":", linewidth=1)
        ax.annotate(f"tolerance {tol:g}", (ax.get_xlim()[0], tol), textcoords="offset points", xytext=(3, 3),
                    fontsize=8, color="tab:orange")
    ax.set_xlabel("p50 latency, batch 1 (ms)")
    ax.set_ylabel(label)
    ax.set_title(f"Trials of {stage['node']}: accuracy vs latency (green: meets tolerances)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, format="png")
    return True


def _sensitivity(report: dict[str, Any], path: Path) -> bool:
    rows = None
    for s in report.get("stages", []):
        sens = (s.get("metrics") or {}).get("sensitivity")
        if isinstance(sens, list) and sens:
            rows = sens
    if not rows:
        return False
    rows = rows[:SENSITIVITY_BARS]
    fig = _figure(6.4, 1.2 + 0.28 * len(rows))
    ax = fig.add_subplot()
    names = [f"{r['node']} ({r.get('op_type', '')})" for r in rows][::-1]
    sqnr = "added_nsr" in rows[0]
    key = "added_nsr" if sqnr else "cosine_loss"
    losses = [max(float(r.get(key) or 0.0), 0.0) for r in rows][::-1]
    ax.barh(range(len(rows)), losses, color="tab:blue")
    ax.set_yticks(range(len(rows)), labels=names, fontsize=7)
    ax.set_xlabel("noise the node adds (output NSR minus input NSR, full INT8 model)" if sqnr
                  else "cosine loss with only this node quantized (1 - cosine)")
    ax.set_title(f"Sensitivity ranking (top {len(rows)}): most sensitive on top", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, format="png")
    return True


def _latency(report: dict[str, Any], path: Path) -> bool:
    bench = [s for s in report.get("stages", []) if s.get("pass") == "benchmark" and s.get("metrics")]
    if not bench:
        return False
    b1 = (bench[-1]["metrics"].get("batch") or {}).get("1") or {}
    samples = b1.get("latencies_ms")
    if not samples:
        return False
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    import numpy as np

    bins: Any = min(40, max(5, len(samples) // 3))
    lo, hi = min(samples), max(samples)
    wide = lo > 0 and hi / lo > 10  # outliers (p99 >> p50): a log axis keeps the bulk visible
    if wide:
        bins = np.geomspace(lo, hi, bins + 1)
    ax.hist(samples, bins=bins, color="tab:blue", alpha=0.8)
    if wide:
        ax.set_xscale("log")
    for q, style in (("p50_ms", "-"), ("p99_ms", "--")):
        if b1.get(q) is not None:
            ax.axvline(b1[q], color="black", linestyle=style, linewidth=1)
            ax.annotate(f"{q[:3]} {b1[q]:.3g} ms", (b1[q], ax.get_ylim()[1]), textcoords="offset points",
                        xytext=(3, -12), fontsize=8)
    ax.set_xlabel("latency per call, batch 1 (ms" + (", log scale)" if wide else ")"))
    ax.set_ylabel("timed runs")
    kind = bench[-1]["metrics"].get("artifact_kind", "")
    ax.set_title(f"Batch-1 latency distribution of the artifact ({kind}, {len(samples)} runs)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, format="png")
    return True


#: File in a generation that names the data its plots were drawn from (see :func:`write_plots`).
PLOTS_KEY = "plots.key"


def plots_key(report: dict[str, Any]) -> str:
    """sha256 of what the plots draw: every stage's node and metrics (a warm build's are the cached ones)."""
    import hashlib
    import json

    data = [(s.get("node"), s.get("metrics")) for s in report.get("stages", [])]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_plots(out_dir: Path, report: dict[str, Any], previous: Path | None = None) -> dict[str, str]:
    """Draw every plot the report has data for into ``out_dir`` (each through a temporary file and
    ``os.replace``), remove the others' stale files; returns ``{plot: file name}`` written.

    ``previous``: the out dir's current generation. When its plots were drawn from the same data
    (:func:`plots_key`, recorded in :data:`PLOTS_KEY`), they are copied instead of drawn, so a warm
    build does not import matplotlib.

    Raises ``OSError`` when the out dir cannot be written."""
    import os
    import shutil

    key = plots_key(report)
    names = ("accuracy_latency.png", "sensitivity.png", "latency_batch1.png")
    drawn: dict[str, str] = {}
    reuse = previous is not None and (previous / PLOTS_KEY).is_file() and (previous / PLOTS_KEY).read_text() == key
    if reuse:
        assert previous is not None
        for name in names:
            if (previous / name).is_file():
                tmp = out_dir / f".{name}.tmp"
                shutil.copyfile(previous / name, tmp)
                os.replace(tmp, out_dir / name)
                drawn[name.removesuffix(".png")] = name
        (out_dir / PLOTS_KEY).write_text(key)
        return drawn
    for name, draw in zip(names, (_accuracy_latency, _sensitivity, _latency), strict=True):
        dest = out_dir / name
        tmp = out_dir / f".{name}.tmp"
        try:
            ok = draw(report, tmp)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        if ok:
            os.replace(tmp, dest)
            drawn[name.removesuffix(".png")] = name
        else:
            tmp.unlink(missing_ok=True)
            dest.unlink(missing_ok=True)
    (out_dir / PLOTS_KEY).write_text(key)
    return drawn
