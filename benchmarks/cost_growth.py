"""How a cold build's cost grows with the model and the calibration set (issue 12, item 6).

For each model (ResNet-18 and ResNet-50 and MobileNetV3-Large with initialised torchvision
weights, EfficientNet-Lite0 with its ImageNet weights) and each calibration-set size (64 and
512 random-resized crops of the recipe photos), ``accelc build`` runs cold (a fresh cache) as a
subprocess of its own, one after the other, with the cpu target's default INT8 pipeline
(accuracy-aware calibration and fallback); the benchmark stage is off, since its cost is set by
``benchmark.iterations``, not by the model. Recorded per build: wall time (s, imports
included), peak resident memory of the build process (MiB, ``ru_maxrss`` from ``os.wait4``), the
seconds of ``calibrate`` and ``quantize`` and their phases from report.json, and the number
of quantized nodes. Then the growth: the ratio of each cost at 512 samples to 64 (linear in
samples is 8x), and calibrate seconds per node-sample.

    python -m benchmarks.cost_growth --markdown build/benchmarks/cost_growth.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

#: name -> (model section, preprocess, tolerances). Initialised weights give near-uniform logits,
#: so those models are checked on cosine alone (as recipes/resnet18_cpu_int8.yaml does).
MODELS: dict[str, tuple[dict[str, Any], dict[str, Any] | None, dict[str, float]]] = {
    "resnet18": ({"source": "torchvision", "name": "resnet18", "seed": 0}, None, {"cosine": 0.98}),
    "resnet50": ({"source": "torchvision", "name": "resnet50", "seed": 0}, None, {"cosine": 0.98}),
    "mobilenet_v3_large": ({"source": "torchvision", "name": "mobilenet_v3_large", "seed": 0}, None, {"cosine": 0.98}),
    "efficientnet_lite0": ("default recipe", None, {}),
}
SAMPLES = (64, 512)
PHOTOS = 8  # images in recipes/data/photos/calibration


def recipe_for(name: str, samples: int, folder: Path) -> Path:
    """A recipe for ``name`` with ``samples`` calibration crops (``samples / 8`` per photo), no benchmark."""
    model, _, tol = MODELS[name]
    if model == "default recipe":
        doc = yaml.safe_load((REPO / "recipes" / "efficientnet_lite0_cpu_int8.yaml").read_text())
        doc.pop("passes", None)  # the cpu target's default pipeline, as for the other models
    else:
        doc = {
            "name": name,
            "model": model,
            "inputs": [{"name": "input", "shape": [1, 3, 224, 224],
                        "dynamic": [{"axis": 0, "name": "batch", "min": 1, "opt": 1, "max": 32}]}],
            "target": "cpu",
            "precision": "int8",
            "data": {"calibration": {"images": "data/photos/calibration", "crops": {"per_image": 8, "seed": 0}},
                     "validation": {"images": "data/photos/validation", "crops": {"per_image": 16, "seed": 1}}},
            "verify": {"tolerances": tol},
        }
    doc["name"] = f"{name}_{samples}"
    doc["data"]["calibration"].setdefault("crops", {})["per_image"] = samples // PHOTOS
    doc["benchmark"] = {"enabled": False}
    path = folder / f"{name}_{samples}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_build(recipe: Path, work: Path) -> dict[str, Any]:
    """One cold ``accelc build`` in its own process: wall s, peak RSS MiB, exit code, the report."""
    out, cache = work / f"{recipe.stem}-out", work / f"{recipe.stem}-cache"
    accelc = Path(sys.executable).with_name("accelc")
    cmd = [str(accelc), "build", str(recipe), "--out", str(out), "--cache-dir", str(cache)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read() if proc.stderr else ""
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    stages = {s["node"]: s for s in report.get("stages", [])}
    quant = (stages.get("quantize") or {}).get("metrics") or {}
    return {
        "recipe": recipe.stem,
        "exit": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
        "calibrate_s": round((stages.get("calibrate") or {}).get("seconds", 0.0), 1),
        "quantize_s": round((stages.get("quantize") or {}).get("seconds", 0.0), 1),
        "calibrate_phases": ((stages.get("calibrate") or {}).get("metrics") or {}).get("timing_s"),
        "quantize_phases": quant.get("timing_s"),
        "quantized_nodes": quant.get("quantize_linear_nodes"),  # QuantizeLinear nodes of the kept model
        "sensitivity_units": len(quant.get("sensitivity") or []),
        "kept": quant.get("kept"),
        "error": None if os.waitstatus_to_exitcode(status) == 0 else stderr.strip().splitlines()[-1:],
    }


def render(rows: list[dict[str, Any]]) -> str:
    """The Markdown table, then the growth per model (512 over 64 samples)."""
    lines = ["| model | calibration samples | QuantizeLinear nodes | cold build s | calibrate s | quantize s | "
             "peak RSS MiB | kept | exit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['samples']} | {r['quantized_nodes']} | {r['wall_s']} | {r['calibrate_s']} | "
                     f"{r['quantize_s']} | {r['peak_rss_mib']} | {r['kept']} | {r['exit']} |")
    lines += ["", "| model | cold build 512/64 | calibrate 512/64 | quantize 512/64 | peak RSS 512/64 | "
              "calibrate ms per node-sample (512) |", "|---|---|---|---|---|---|"]
    by = {(r["model"], r["samples"]): r for r in rows}
    for m in dict.fromkeys(r["model"] for r in rows):
        a, b = by.get((m, 64)), by.get((m, 512))
        if not a or not b:
            continue

        def ratio(k: str, a: dict = a, b: dict = b) -> str:
            return f"{b[k] / a[k]:.2f}x" if a[k] else "-"

        per = 1e3 * b["calibrate_s"] / (b["quantized_nodes"] * 512) if b["quantized_nodes"] else None
        lines.append(f"| {m} | {ratio('wall_s')} | {ratio('calibrate_s')} | {ratio('quantize_s')} | "
                     f"{ratio('peak_rss_mib')} | {per:.3f} |" if per else f"| {m} | - | - | - | - | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--samples", nargs="+", type=int, default=list(SAMPLES))
    ap.add_argument("--json", type=Path, default=REPO / "build" / "benchmarks" / "cost_growth.json")
    ap.add_argument("--markdown", type=Path, default=REPO / "build" / "benchmarks" / "cost_growth.md")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="accelc-cost-") as tmp:
        work = Path(tmp)
        folder = REPO / "recipes"  # the recipes' data paths are relative to recipes/
        for name in args.models:
            for n in args.samples:
                recipe = recipe_for(name, n, work)
                target = folder / f".cost_growth_{recipe.name}"
                target.write_text(recipe.read_text())
                try:
                    r = run_build(target, work)
                finally:
                    target.unlink(missing_ok=True)
                r.update(model=name, samples=n)
                rows.append(r)
                print(json.dumps(r), flush=True)
                # written after every build, so an interrupted run keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(rows, indent=1))
                args.markdown.write_text(render(rows))
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
