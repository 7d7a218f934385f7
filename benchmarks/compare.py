"""Compare accelc's artifacts with what a user would otherwise deploy, in one run, on the same inputs.

For every selected recipe this script:

1. builds it with ``accelc build`` twice in a fresh cache dir, each build a subprocess timed by
   wall clock, imports included: the first is the cold build, the second the warm rebuild;
2. prepares the alternatives the way a user would, each step a timed subprocess:
   ``torch.onnx.export(model, x, path)`` with torch's defaults (plus a dynamic batch axis, so the
   larger batch runs) and ``quantize_static(fp32, int8, reader)`` with ONNX Runtime's defaults,
   calibrated on the recipe's own calibration data;
3. saves the inputs (one batch-1 feed, one larger-batch feed, the recipe's validation data) and
   times every variant alone in a worker process of its own (``benchmarks.workers``), alternating
   the processes over rounds the way hyperfine alternates commands: round r starts one worker per
   variant, in an order rotated by r (``summary.round_order``). Each worker loads its variant,
   makes an untimed first call and warm-up calls, then ``iterations`` timed batch-1 calls, then
   the same at the larger batch, and reports every call's time and its peak resident memory
   (``VmHWM``). Process start, imports and model load are outside the timed calls. p50 is the
   median of the per-round medians, the spread their range; torch.compile's first calls in round 1
   (empty inductor cache) and round 2 (populated) are its cold and warm build times;
4. compares each variant with eager FP32 on the validation data (top-1 agreement, cosine
   similarity: ``accelc.passes.verification.compare_outputs``), from the outputs each variant's
   first worker saved after its timed calls.

Every variant gets the same thread count (``torch.set_num_threads``, ONNX Runtime's
``intra_op_num_threads`` with ``inter_op_num_threads=1``, OpenVINO's ``INFERENCE_NUM_THREADS``),
printed and recorded. Timed calls take numpy arrays in and return a numpy array, host copies
included, for every variant alike.

Run from the repository root::

    python -m benchmarks.compare --quick                 # smoke run, minutes
    python -m benchmarks.compare --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.profiling import gemm_peaks
from benchmarks.summary import (
    COST_COLUMNS,
    LABELS,
    LATENCY_COLUMNS,
    SCHEMA_VERSION,
    THROUGHPUT_COLUMNS,
    VARIANTS,
    best_alternative_line,
    conv_gops,
    finding_lines,
    finish_recipe,
    latency_summary,
    margin_stats,
    pixel_step_noise,
    render_markdown,
    rss_summary,
    table_rows,
    throughput_summary,
    to_json,
)
from benchmarks.variants import Skip
from benchmarks.workers import REPO, SUBPROCESS_TIMEOUT_S, Rounds, run_worker, save_feeds, time_in_processes

RECIPES = REPO / "recipes"



@dataclass(frozen=True)
class Settings:
    """How long to measure: ``rounds`` rounds of one worker process per variant; in each process
    ``warmup`` untimed then ``iterations`` timed batch-1 calls, then ``throughput_warmup`` untimed
    and ``throughput_iterations`` timed larger-batch calls (each block after one untimed first call)."""

    rounds: int = 5
    iterations: int = 300
    throughput_iterations: int = 10
    warmup: int = 30
    throughput_warmup: int = 2
    quick: bool = False


FULL = Settings()
QUICK = Settings(rounds=2, iterations=5, throughput_iterations=1, warmup=1, throughput_warmup=1, quick=True)


def build_accelc(recipe_path: Path, work: Path) -> dict[str, Any]:
    """Build the recipe with ``accelc build`` in a fresh cache dir twice (cold, warm), each a
    subprocess timed by wall clock. Returns build times (s), status, the per-stage seconds of the
    cold build, and the final artifact (opened from the store, also when verification failed)."""
    from accelc.cache import Store

    cache, out = work / "accelc-cache", work / "accelc-out"
    cmd = [
        sys.executable,
        "-m",
        "accelc.cli",
        "build",
        str(recipe_path),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    times, reports, codes = [], [], []
    for _ in range(2):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
        times.append(time.perf_counter() - t0)
        codes.append(p.returncode)
        try:
            reports.append(json.loads((out / "report.json").read_text()))
        except (OSError, ValueError):
            tail = "\n".join(p.stderr.strip().splitlines()[-5:])
            return {
                "cold_s": times[0],
                "warm_s": None,
                "status": "failed",
                "error": f"no report.json: {tail}",
                "artifact": None,
            }
    cold, warm = reports
    res: dict[str, Any] = {
        "cold_s": times[0],
        "warm_s": times[1],
        "exit_codes": codes,
        "status": warm["status"],
        "error": (warm.get("error") or {}).get("message"),
        "warm_all_cached": all(s["cached"] for s in warm["stages"]),
        "warm_rebuilt": [s["node"] for s in warm["stages"] if not s["cached"]],
        "cold_stage_s": {s["node"]: s["seconds"] for s in cold["stages"]},
        "artifact": None,
    }
    lock = json.loads((out / "accelc.lock").read_text())
    final_node = lock["final"]["node"]
    stage = next((s for s in warm["stages"] if s["node"] == final_node), None)
    if stage is not None and stage["status"] == "ok":
        art = Store(cache).open(stage["artifact"]["key"])
        res["artifact"] = {
            "kind": art.kind,
            "path": str(art.path),
            "main": art.main,
            "digest": art.digest,
            "meta": art.meta,
        }
        res["final_node"] = final_node
    verify = [s for s in warm["stages"] if s["pass"] == "verify"]
    res["verify"] = {s["node"]: {k: s["metrics"].get(k) for k in ("top1_agreement", "cosine")} for s in verify}
    return res


# --- one recipe ---------------------------------------------------------------------------------------


def _fail_reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}" if not isinstance(e, Skip) else text


def _empty_variant(name: str) -> dict[str, Any]:
    return {
        "label": LABELS[name],
        "status": "ok",
        "reason": None,
        "verified": None,
        "latency": None,
        "throughput": None,
        "peak_rss_mib": None,
        "quality": None,
        "build": {"cold_s": None, "warm_s": None, "note": ""},
    }




def prepare_alternatives(
    recipe: Any,
    spec: dict[str, Any],
    vres: dict[str, dict[str, Any]],
    work: Path,
    env: dict[str, str],
    say: Callable[[str], None],
) -> Path:
    """Export with torch's defaults, then ``quantize_static`` with ORT's defaults, each a timed
    subprocess; record the files (or why not) in ``spec`` and the times in ``vres``. Returns the
    spec file written for them."""
    export_s: float | None = None
    spec_file = work / "spec.json"
    if {"ort_fp32", "ov_fp32", "ort_int8_qs"} & set(vres):
        say("torch.onnx.export with defaults")
        spec_file.write_text(json.dumps({**spec, "out": str(work / "fp32.onnx")}))
        try:
            _, export_s = run_worker(["export", "--spec", str(spec_file)], env)
            spec["ort_fp32"] = str(work / "fp32.onnx")
            for name in ("ort_fp32", "ov_fp32"):
                if name in vres:
                    vres[name]["build"] = {
                        "cold_s": export_s,
                        "warm_s": None,
                        "note": "export subprocess wall time; nothing is cached",
                    }
        except RuntimeError as e:
            spec["ort_fp32_reason"] = spec["ort_int8_qs_reason"] = f"export failed: {e}"
            export_s = None
    if "ort_int8_qs" in vres and spec.get("ort_fp32"):
        if "calibration" not in recipe.data:
            spec["ort_int8_qs_reason"] = "the recipe has no calibration data"
        else:
            say("quantize_static with defaults")
            spec_file.write_text(json.dumps({**spec, "fp32": spec["ort_fp32"], "out": str(work / "int8_qs.onnx")}))
            try:
                _, quant_s = run_worker(["quantize", "--spec", str(spec_file)], env)
                spec["ort_int8_qs"] = str(work / "int8_qs.onnx")
                vres["ort_int8_qs"]["build"] = {
                    "cold_s": (export_s or 0.0) + quant_s,
                    "warm_s": None,
                    "note": "export + quantize_static subprocess wall times; nothing is cached",
                }
            except RuntimeError as e:
                spec["ort_int8_qs_reason"] = f"quantize_static failed: {e}"
    spec_file.write_text(json.dumps(spec))
    return spec_file


def bench_recipe(
    recipe_path: Path,
    settings: Settings,
    threads: int,
    variants: list[str],
    work: Path,
    batch: int | None,
    profile: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Measure every variant for one recipe; returns the recipe result (see ``benchmarks.summary``)."""
    from accelc.passes.verification import compare_outputs
    from accelc.recipe import load_recipe
    from accelc.registry import default_registry

    reg = default_registry()
    recipe = load_recipe(recipe_path, reg)
    device = reg.targets[recipe.target].device
    res: dict[str, Any] = {
        "recipe": recipe.name,
        "file": str(recipe_path),
        "target": recipe.target,
        "device": device,
        "status": "ok",
        "notes": [],
        "load_avg_start": os.getloadavg(),
    }
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            res.update(
                status="skipped",
                reason=f"target '{recipe.target}' needs a CUDA GPU and "
                "torch.cuda.is_available() is False on this machine",
            )
            return res
    work.mkdir(parents=True, exist_ok=True)
    sizes = [b for b in recipe.benchmark.get("batch_sizes", [1, 8]) if b > 1] or [8]
    big = min(batch or max(sizes), recipe.signature.max_batch())
    res["batch"] = big
    vres = {name: _empty_variant(name) for name in VARIANTS if name in variants}
    res["variants"] = vres
    spec: dict[str, Any] = {
        "recipe": str(recipe_path),
        "threads": threads,
        "device": device,
        "batch": big,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}

    # 1. accelc build, cold then warm
    if "accelc" in vres:
        say("accelc build (cold, then warm)")
        b = build_accelc(recipe_path, work)
        res["accelc_build"] = {k: v for k, v in b.items() if k != "artifact"}
        vres["accelc"]["build"] = {
            "cold_s": b["cold_s"],
            "warm_s": b["warm_s"],
            "note": "accelc build subprocess wall time: fresh cache dir, then the same again",
        }
        vres["accelc"]["verified"] = b["status"] == "ok"
        if b["artifact"]:
            spec["accelc"] = b["artifact"]
            if b["status"] != "ok":
                res["notes"].append(
                    f"accelc build failed verification ({b['error']}); its final artifact "
                    "is measured anyway, from the cache, and marked UNVERIFIED"
                )
        else:
            spec["accelc_reason"] = f"build {b['status']}: {b['error']}"
        if b.get("warm_rebuilt"):
            res["notes"].append(
                f"the warm rebuild re-ran {', '.join(b['warm_rebuilt'])}: their cache keys differ from the cold "
                "build's (a pass's options, version or packages changed in between, or a key is not deterministic)"
            )

    # 2. the alternatives, prepared as a user would
    spec_file = prepare_alternatives(recipe, spec, vres, work, env, say)
    spec = json.loads(spec_file.read_text())
    for name, reason in pre_skips(vres, device).items():
        vres[name]["status"], vres[name]["reason"] = "skipped", reason

    # 3. the inputs every worker reads, saved once
    val_spec = recipe.data.get("validation")
    if val_spec is None:
        raise RuntimeError(f"{recipe.name}: the recipe has no validation data")
    val = reg.data_sources[val_spec["source"]].load(val_spec, recipe.signature)
    names = recipe.signature.names
    n_val = len(val[names[0]])
    inputs = work / "inputs"
    idx = np.arange(big) % n_val
    feed_sets = [
        {"key": "latency", "batch": 1, "warmup": settings.warmup, "iterations": settings.iterations,
         "path": str(save_feeds(inputs / "batch1.npz", {k: val[k][:1] for k in names}))},
        {"key": "throughput", "batch": big, "warmup": settings.throughput_warmup,
         "iterations": settings.throughput_iterations,
         "path": str(save_feeds(inputs / f"batch{big}.npz", {k: val[k][idx] for k in names}))},
    ]
    validation = save_feeds(inputs / "validation.npz", {k: val[k] for k in names})
    outputs = work / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    evaluate = {
        name: [{"inputs": str(validation), "out": str(outputs / f"{name}-validation.npy"), "batch": big}]
        for name in vres
    }
    if "images" in val_spec and len(names) == 1 and val[names[0]].ndim == 4:
        from accelc.sources.data import IMAGENET_STD

        std = (val_spec.get("preprocess") or {}).get("std") or IMAGENET_STD
        noisy = save_feeds(inputs / "noisy.npz", {names[0]: pixel_step_noise(val[names[0]], std)})
        evaluate["eager"].append({"inputs": str(noisy), "out": str(outputs / "eager-noisy.npy"), "batch": big})

    # 4. every variant timed alone in its own process, the processes alternated over rounds
    shutil.rmtree(work / "inductor", ignore_errors=True)  # round 1's torch.compile starts cold
    running = [name for name, v in vres.items() if v["status"] == "ok"]
    wspec = {**spec, "feed_sets": feed_sets, "work": str(work)}
    rounds = time_in_processes(running, wspec, settings.rounds, work / "workers", env, evaluate, say)
    res["round_orders"] = rounds.orders
    summarize_rounds(vres, rounds, big)
    if not rounds.results.get("eager"):
        raise RuntimeError(f"{recipe.name}: eager FP32, the reference, did not run: {vres['eager']['reason']}")

    # 5. agreement, from the outputs each variant's first worker saved
    say(f"quality on {n_val} validation samples (batch {big})")
    ref = np.load(outputs / "eager-validation.npy")
    res["reference_margin"] = margin_stats(ref)
    if (outputs / "eager-noisy.npy").is_file():
        out = np.load(outputs / "eager-noisy.npy")
        m = compare_outputs(ref, out)
        res["noise_floor"] = {
            "steps": 0.5,
            "samples": m["samples"],
            "top1_agreement": m["top1_agreement"],
            "cosine": m["cosine"],
            "flipped": margin_stats(ref, out)["flipped"],
        }
    for name in rounds.results:
        out = np.load(outputs / f"{name}-validation.npy")
        m = compare_outputs(ref, out)
        m["margin"] = margin_stats(ref, out)
        vres[name]["quality"] = {
            k: m[k] for k in ("samples", "top1_agreement", "cosine", "cosine_min", "max_abs_error", "margin")
        }

    if profile:
        if device == "cpu":
            say("GEMM peaks")
            res["gemm_peaks"] = gemm_peaks(threads)
        prof: dict[str, Any] = {}
        pspec = work / "workers" / "profile.json"
        pspec.write_text(json.dumps({**wspec, "profile_runs": max(20, settings.iterations // 5)}))
        for name in rounds.results:
            say(f"profiling {name} at batch 1 in its own process")
            try:
                r, _ = run_worker(["profile", "--variant", name, "--spec", str(pspec)], env)
            except RuntimeError as e:
                res["notes"].append(f"profile of {name} failed: {e}")
                continue
            if r.get("macs"):
                res["macs"] = r["macs"]
            if r.get("profile"):
                prof[name] = r["profile"]
        for p in prof.values():
            p["conv_gops"] = conv_gops(res.get("macs"), p.get("conv_min_ms"))
        res["profile"] = prof
    res["load_avg_end"] = os.getloadavg()
    for name, v in vres.items():
        if v["status"] != "ok":
            res["notes"].append(f"{name} {v['status']}: {v['reason']}")
    return finish_recipe(res)


def pre_skips(vres: dict[str, dict[str, Any]], device: str) -> dict[str, str]:
    """Variants known not to run here before any worker starts (``{name: reason}``): OpenVINO's
    default on a non-CPU target, or without the openvino package."""
    import importlib.util

    out = {}
    if "ov_fp32" in vres and vres["ov_fp32"]["status"] == "ok":
        if device != "cpu":
            out["ov_fp32"] = f"OpenVINO's CPU plugin runs on the CPU only (this target's device is {device})"
        elif importlib.util.find_spec("openvino") is None:
            out["ov_fp32"] = (
                "the openvino package is not installed, so OpenVINO's default is not measured "
                "(pip install the openvino version pinned in pyproject.toml)"
            )
    return out


def _set_stats(times: list[float], batch: int) -> dict[str, float]:
    a = np.asarray(times, dtype=np.float64) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "samples_per_s": float(batch / (a.mean() / 1e3)) if a.size and a.mean() > 0 else None,
        "calls": int(a.size),
    }


def summarize_rounds(vres: dict[str, dict[str, Any]], rounds: Rounds, batch: int) -> None:
    """Fill each variant's ``latency`` (batch 1), ``throughput`` (at ``batch``), ``peak_rss_mib``
    (median over its workers; ``peak_rss`` has the range) and ``workers`` (per round: pid,
    position in the round, load time, first-call times, per-process p50/p99, peak RSS) from the
    rounds' worker results; failed or skipped variants get their status and reason. torch.compile's
    build times are its first calls in round 1 (cold: empty inductor cache) and round 2 (warm)."""
    for name, reason in rounds.failures.items():
        if name in vres:
            skipped = reason.startswith("skipped:")
            vres[name]["status"] = "skipped" if skipped else "failed"
            vres[name]["reason"] = reason.removeprefix("skipped:").strip()
    for name, results in rounds.results.items():
        if not results or name not in vres:
            continue
        v = vres[name]
        v["latency"] = latency_summary([w["sets"]["latency"]["times_s"] for w in results])
        v["throughput"] = throughput_summary([w["sets"]["throughput"]["times_s"] for w in results], batch)
        v["peak_rss"] = rss_summary([w["peak_rss_mib"] for w in results])
        v["peak_rss_mib"] = v["peak_rss"]["median"]
        v["workers"] = [
            {
                **{k: w.get(k) for k in ("pid", "round", "position", "load_s", "wall_s", "threads", "threads_in_use",
                                         "peak_rss_mib", "children_peak_rss_mib")},
                "first_call_s": {key: st["first_call_s"] for key, st in w["sets"].items()},
                "sets": {
                    key: _set_stats(st["times_s"], 1 if key == "latency" else batch) for key, st in w["sets"].items()
                },
            }
            for w in results
        ]
        if name == "compile":
            first = [sum(w["first_call_s"].values()) for w in v["workers"]]
            v["build"] = {
                "cold_s": first[0],
                "warm_s": first[1] if len(first) > 1 else None,
                "note": "first calls at batch 1 and the larger batch in the first two rounds' processes, "
                "empty (cold) then populated (warm) inductor cache; imports excluded",
            }


# --- the document -------------------------------------------------------------------------------------


def _cpu_family_model() -> str | None:
    """``"family 25, model 17"`` from /proc/cpuinfo (names a CPU generation when a hypervisor
    reports only a brand string such as "AMD EPYC"); ``None`` off Linux."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip():
                break
    except OSError:
        return None
    if len(fields) < 2:
        return None
    return f"family {fields['cpu family']}, model {fields['model']}"


def machine_info() -> dict[str, Any]:
    """CPU model, CPU count, ISA flags that matter for INT8, OS, Python and package versions."""
    from accelc.environment import package_version
    from accelc.host import Host

    host = Host()
    info: dict[str, Any] = {
        "cpu": host.cpu_model,
        "cpu_family_model": _cpu_family_model(),
        "cpus": host.cpu_count,
        "avx512f": "avx512f" in host.cpu_flags,
        "avx512_vnni": "avx512_vnni" in host.cpu_flags,
        "amx": "amx_tile" in host.cpu_flags,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for pkg in ("accelc", "torch", "onnxruntime", "openvino", "onnx", "numpy"):
        info[pkg] = package_version(pkg)
    cuda = host.cuda
    if cuda:
        info["gpu"] = cuda
    return info


def resolve_recipes(names: list[str] | None) -> list[Path]:
    """Recipe files from names (``resnet18_cpu_int8``) or paths; default: every recipe in recipes/."""
    if not names:
        return sorted(RECIPES.glob("*.yaml"))
    out = []
    for n in names:
        p = Path(n)
        if not p.suffix:
            p = RECIPES / f"{n}.yaml"
        if not p.is_file():
            known = ", ".join(sorted(x.stem for x in RECIPES.glob("*.yaml")))
            raise SystemExit(f"no recipe {n!r} (known: {known})")
        out.append(p.resolve())
    return out


def print_recipe(console: Any, r: dict[str, Any], threads: int) -> None:
    """The recipe's two tables (speed; quality and cost), best alternatives, targets and notes."""
    from rich.markup import escape
    from rich.table import Table

    if r["status"] != "ok":
        console.print(f"[yellow]{r['status']}[/] {escape(r['recipe'])}: {escape(r.get('reason', ''))}")
        return
    tables = (
        (LATENCY_COLUMNS, "batch-1 latency"),
        (THROUGHPUT_COLUMNS, f"throughput at batch {r.get('batch')}"),
        (COST_COLUMNS, "quality and cost"),
    )
    for cols, title in tables:
        header, rows = table_rows(r, cols)
        header = [h.removeprefix("bs1 ").removeprefix(f"bs{r.get('batch')} ") for h in header]  # in the title
        t = Table(title=f"{r['recipe']} ({r['device']}, {threads} threads): {title}", title_justify="left")
        longest_word = max((len(w) for row in rows for w in row[0].split()), default=8)
        t.add_column(header[0], overflow="fold", min_width=longest_word)  # labels wrap at spaces, whole words
        for i, h in enumerate(header[1:], 1):  # a column is never narrower than its numbers; headers wrap
            t.add_column(h, justify="right", min_width=max((len(row[i]) for row in rows), default=1))
        for row in rows:
            t.add_row(*map(escape, row))
        console.print(t)
    console.print(f"best alternative: {escape(best_alternative_line(r))}")
    for prefix, line in finding_lines(r):
        if prefix:
            style = "dim"
        else:
            style = "green" if line.startswith("met") else "red" if line.startswith("MISSED") else "yellow"
        console.print(f"[{style}]{escape(prefix + line)}[/]")


def write_outputs(doc: dict[str, Any], json_path: Path, markdown_path: Path) -> None:
    """Write the JSON document and its Markdown rendering (directories created as needed)."""
    for dest, text in ((json_path, to_json(doc)), (markdown_path, render_markdown(doc))):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)


def rerender(json_path: Path, markdown_path: Path) -> int:
    """``--from-json``: print a saved result's tables and write its Markdown, measuring nothing."""
    from rich.console import Console

    doc = json.loads(json_path.read_text())
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    for r in doc.get("recipes", []):
        console.rule(r.get("recipe", "?"))
        print_recipe(console, r, doc.get("threads", "?"))
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(render_markdown(doc))
    console.print(f"wrote {markdown_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line; see ``--help``."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Build accelc's recipes and compare each artifact with eager PyTorch FP32, "
        "torch.compile, ONNX Runtime FP32, OpenVINO's default and the quantize_static one-liner, in one run on "
        "the same inputs, each variant timed alone in a worker process of its own.",
    )
    ap.add_argument("--recipes", nargs="+", metavar="NAME", help="recipe names or files (default: all in recipes/)")
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="variants to measure (eager, the reference, is always included)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: few rounds and iterations; not for quoting")
    ap.add_argument(
        "--rounds", type=int, help=f"rounds of one worker process per variant, alternated (default {FULL.rounds})"
    )
    ap.add_argument("--warmup", type=int, help=f"untimed batch-1 calls per process before the timed ({FULL.warmup})")
    ap.add_argument("--iterations", type=int, help=f"timed batch-1 calls per process ({FULL.iterations})")
    ap.add_argument(
        "--throughput-iterations",
        type=int,
        help=f"timed larger-batch calls per process ({FULL.throughput_iterations})",
    )
    ap.add_argument("--batch", type=int, help="the larger batch (default: the recipe's largest benchmark batch)")
    ap.add_argument("--threads", type=int, help="threads for every variant (default: the CPUs this process may use)")
    ap.add_argument("--profile", action="store_true", help="also profile batch 1: per-operator time")
    ap.add_argument("--conditions", default="", help="free text recorded with the results (e.g. machine load)")
    ap.add_argument(
        "--json",
        type=Path,
        default=REPO / "build" / "benchmarks" / "compare.json",
        help="write the results here (default: build/benchmarks/compare.json)",
    )
    ap.add_argument(
        "--markdown",
        type=Path,
        default=REPO / "build" / "benchmarks" / "compare.md",
        help="write the README section here (default: build/benchmarks/compare.md)",
    )
    ap.add_argument("--workdir", type=Path, help="keep builds and exports here (default: a temp dir, removed)")
    ap.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="measure nothing: print the tables of a saved JSON result and write its --markdown",
    )
    a = ap.parse_args(argv)
    if a.from_json:
        return rerender(a.from_json, a.markdown)

    from rich.console import Console
    from rich.markup import escape

    from accelc.runners import default_threads

    console = Console(highlight=False)
    if not console.is_terminal:  # piped to a file: do not fold the tables at 80 columns
        console = Console(highlight=False, width=150)
    base = QUICK if a.quick else FULL
    settings = Settings(
        rounds=a.rounds or base.rounds,
        iterations=a.iterations or base.iterations,
        throughput_iterations=a.throughput_iterations or base.throughput_iterations,
        warmup=a.warmup or base.warmup,
        throughput_warmup=base.throughput_warmup,
        quick=a.quick,
    )
    threads = a.threads or default_threads()
    variants = list(dict.fromkeys(["eager", *a.variants]))
    recipes = resolve_recipes(a.recipes)
    machine = machine_info()
    console.print(
        f"machine: {escape(machine['cpu'])}, {machine['cpus']} CPUs"
        f"{', AVX-512 VNNI' if machine['avx512_vnni'] else ''}; torch {machine['torch']}, "
        f"onnxruntime {machine['onnxruntime']}, openvino {machine['openvino']}"
    )
    console.print(
        f"threads: {threads} for every variant (torch.set_num_threads, ORT intra_op_num_threads with "
        f"inter_op 1, OpenVINO INFERENCE_NUM_THREADS); each variant timed alone in its own process, "
        f"{settings.rounds} rounds alternating the processes; per process {settings.warmup} warm-up + "
        f"{settings.iterations} timed batch-1 calls, {settings.throughput_warmup} + {settings.throughput_iterations} "
        f"at the larger batch{' (quick: not for quoting)' if settings.quick else ''}"
    )
    work_root = a.workdir or Path(tempfile.mkdtemp(prefix="accelc-bench-"))
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine,
        "threads": threads,
        "settings": asdict(settings),
        "conditions": a.conditions,
        "recipes": [],
    }
    try:
        for path in recipes:
            console.rule(path.stem)
            with console.status(path.stem) as status:

                def say(msg: str, _s: Any = status, _n: str = path.stem) -> None:
                    _s.update(f"{_n}: {msg}")

                try:
                    r = bench_recipe(path, settings, threads, variants, work_root / path.stem, a.batch, a.profile, say)
                except Exception as e:  # one broken recipe must not lose the others' results
                    r = {
                        "recipe": path.stem,
                        "file": str(path),
                        "status": "failed",
                        "reason": _fail_reason(e),
                    }
            doc["recipes"].append(r)
            print_recipe(console, r, threads)
            write_outputs(doc, a.json, a.markdown)  # after every recipe: an interrupted run keeps what it measured
    finally:
        if a.workdir is None:
            shutil.rmtree(work_root, ignore_errors=True)
    console.print(f"wrote {a.json} and {a.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
