"""Helper of ``scripts/gpu_validate.sh``: target choice, carried wheels, versions, CUDA-graph timing, summary.

Subcommands (``python scripts/gpu_bench.py CMD --help``):

* ``target [--cc 9.0]``: the accelc target for this GPU's compute capability (sm_75 -> ``t4``,
  sm_80 -> ``a100``, sm_90 -> ``h100``, anything else -> ``cuda``), read from torch when ``--cc`` is absent;
* ``missing-wheels DIR``: the wheels in ``DIR`` (``.whl/``) whose distribution is not installed, one
  path a line (installing only those leaves the machine's own torch, numpy... untouched);
* ``versions OUT.json [--nvidia-smi FILE]``: Python, torch, CUDA, cuDNN, the GPU, accelc's recorded packages;
* ``bench OUT.json --build NAME=DIR ...``: load each build with ``accelc.runtime.load``, time batch 1 and 8
  with and without CUDA-graph replay, and check that replayed outputs equal the non-graph run;
* ``summary RESULTS_DIR``: ``summary.json`` and ``summary.md`` from the step records, versions, build
  reports, pytest's JUnit XML and the timings.

Latency is host wall time per call with the GPU synchronised after each call (what a caller waits
for), inputs already on the GPU, output copies included; p50 over ``--iterations`` calls after
``--warmup`` untimed ones. Every writer writes a temporary file and renames it, so a killed step
leaves either the previous file or the new one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: compute capability (major, minor) -> accelc target profile
TARGET_OF_CAPABILITY = {(7, 5): "t4", (8, 0): "a100", (9, 0): "h100"}
#: the batch sizes timed, and the speed-up of graph replay over eager launch expected at batch 1
BATCH_SIZES = (1, 8)
TARGET_SPEEDUP_B1 = 2.0


def target_for_capability(major: int, minor: int) -> str:
    """The accelc target for a CUDA compute capability: ``t4`` (7.5), ``a100`` (8.0), ``h100`` (9.0, which
    includes the H200), otherwise ``cuda`` (the generic profile, which builds for whatever GPU it finds)."""
    return TARGET_OF_CAPABILITY.get((int(major), int(minor)), "cuda")


def parse_capability(text: str) -> tuple[int, int]:
    """``"9.0"`` or ``"sm_90"`` or ``"90"`` -> ``(9, 0)``. Raises ``ValueError`` otherwise."""
    t = text.strip().lower().removeprefix("sm_")
    m = re.fullmatch(r"(\d+)\.(\d+)", t) or re.fullmatch(r"(\d+)(\d)", t)
    if not m:
        raise ValueError(f"not a compute capability: {text!r} (expected e.g. 9.0 or sm_90)")
    return int(m.group(1)), int(m.group(2))


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distribution(filename: str) -> str:
    """The normalised distribution name of a wheel file name (PEP 427: ``{dist}-{version}-...whl``)."""
    if not filename.endswith(".whl") or filename.count("-") < 4:
        raise ValueError(f"not a wheel file name: {filename!r}")
    return normalize(filename.split("-", 1)[0])


def missing_wheels(directory: Path, installed: set[str]) -> list[Path]:
    """Wheels under ``directory`` whose distribution is not in ``installed`` (normalised names), sorted."""
    have = {normalize(n) for n in installed}
    return sorted(p for p in Path(directory).glob("*.whl") if wheel_distribution(p.name) not in have)


def installed_distributions() -> set[str]:
    """Normalised names of every installed distribution."""
    from importlib.metadata import distributions

    return {normalize(d.metadata["Name"]) for d in distributions() if d.metadata["Name"]}


def write_json(path: Path, doc: Any) -> None:
    """Write ``doc`` as indented JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- timing ---------------------------------------------------------------------------------------------


def latency_stats(ms: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99/mean/min of per-call latencies (milliseconds). Raises ``ValueError`` on an empty list."""
    if not ms:
        raise ValueError("no timings")
    s = sorted(ms)

    def pct(q: float) -> float:  # nearest-rank percentile
        return float(s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1])

    return {"p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "mean_ms": sum(s) / len(s),
            "min_ms": float(s[0]), "iterations": len(s)}


def time_calls(fn: Callable[[], Any], sync: Callable[[], None], iterations: int, warmup: int) -> list[float]:
    """Per-call wall time in ms of ``fn`` followed by ``sync`` (the GPU synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def compare_outputs(replayed: Sequence[Any], eager: Sequence[Any], atol: float = 1e-4,
                    rtol: float = 1e-3) -> dict[str, Any]:
    """Replayed vs non-graph outputs (torch tensors): ``bitwise_equal``, ``max_abs_diff``, and ``equal``
    within ``atol + rtol * max|eager|`` per output (the bound ``cuda_graph`` uses), shapes included."""
    import torch

    if len(replayed) != len(eager):
        return {"equal": False, "bitwise_equal": False, "max_abs_diff": None,
                "why": f"{len(replayed)} outputs replayed, {len(eager)} without a graph"}
    worst, bitwise, ok = 0.0, True, True
    for r, e in zip(replayed, eager, strict=True):
        if tuple(r.shape) != tuple(e.shape):
            return {"equal": False, "bitwise_equal": False, "max_abs_diff": None,
                    "why": f"shape {tuple(r.shape)} replayed, {tuple(e.shape)} without a graph"}
        r32, e32 = r.float(), e.float()
        diff = float((r32 - e32).abs().max()) if r.numel() else 0.0
        bound = atol + rtol * (float(e32.abs().max()) if e.numel() else 0.0)
        ok = ok and diff <= bound
        bitwise = bitwise and bool(torch.equal(r, e))
        worst = max(worst, diff)
    return {"equal": ok, "bitwise_equal": bitwise, "max_abs_diff": worst}


def bench_predictor(pred: Any, batch_sizes: Sequence[int], iterations: int, warmup: int,
                    sync: Callable[[], None], seed: int = 0) -> dict[str, Any]:
    """Time one loaded predictor (``accelc.runtime.Predictor`` or anything with its ``shapes``,
    ``input_dtypes``, ``device``, ``replay(shape, inputs)`` and ``eager(*inputs)``).

    For each batch size with a captured graph: seeded standard-normal inputs in the predictor's
    input dtypes on its device, the outputs of one replay compared with one non-graph run
    (:func:`compare_outputs`), then ``eager`` and ``graph`` latency (:func:`latency_stats`) and
    ``speedup_p50`` = eager p50 / graph p50. A batch size without a graph is reported as such.
    """
    import torch

    out: dict[str, Any] = {}
    for b in batch_sizes:
        shape = next((s for s in pred.shapes if all(t[0] == b for t in s)), None)
        if shape is None:
            out[str(b)] = {"error": f"no CUDA graph captured for batch {b} (captured: {pred.shapes})"}
            continue
        g = torch.Generator(device="cpu").manual_seed(seed + b)
        xs = [torch.randn(s, generator=g).to(pred.device).to(dt) if dt.is_floating_point
              else torch.zeros(s, dtype=dt, device=pred.device) for s, dt in zip(shape, pred.input_dtypes, strict=True)]
        replayed = pred.replay(shape, xs)
        eager = pred.eager(*xs)
        sync()
        check = compare_outputs(replayed, eager)
        eager_ms = latency_stats(time_calls(lambda xs=xs: pred.eager(*xs), sync, iterations, warmup))
        graph_ms = latency_stats(time_calls(lambda shape=shape, xs=xs: pred.replay(shape, xs), sync, iterations,
                                            warmup))
        out[str(b)] = {"eager": eager_ms, "graph": graph_ms, "outputs": check,
                       "speedup_p50": eager_ms["p50_ms"] / graph_ms["p50_ms"] if graph_ms["p50_ms"] > 0 else None}
    return out


# -- versions and summary -----------------------------------------------------------------------------


def parse_nvidia_smi(text: str) -> list[dict[str, str]]:
    """Rows of ``nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader``."""
    keys = ("name", "compute_cap", "driver_version", "memory_total")
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == len(keys) and parts[0]:
            rows.append(dict(zip(keys, parts, strict=True)))
    return rows


def collect_versions(nvidia_smi: str | None) -> dict[str, Any]:
    """Python, torch (its CUDA and cuDNN), the GPUs torch sees, nvidia-smi rows and accelc's fingerprint."""
    import platform

    doc: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    if nvidia_smi is not None:
        doc["nvidia_smi"] = parse_nvidia_smi(nvidia_smi)
    try:
        import torch

        doc["torch"] = torch.__version__
        doc["torch_cuda"] = torch.version.cuda
        doc["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            doc["gpus"] = [{"name": torch.cuda.get_device_name(i),
                            "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                           for i in range(torch.cuda.device_count())]
    except Exception as e:  # the record must be written whatever is broken
        doc["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        from accelc.environment import fingerprint

        doc["packages"] = fingerprint()["packages"]
    except Exception as e:
        doc["accelc_error"] = f"{type(e).__name__}: {e}"
    return doc


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``steps.jsonl`` (a malformed line is kept as ``{"raw": line}``)."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
    return out


def junit_counts(path: Path) -> dict[str, int] | None:
    """``{tests, failures, errors, skipped, passed}`` from pytest's ``--junitxml`` file (``None`` if absent/bad)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return c


def _build_digest(report: dict[str, Any]) -> dict[str, Any]:
    stages = report.get("stages", [])
    verify = {s["node"]: {k: v for k, v in s.get("metrics", {}).items() if k in
                          ("top1_agreement", "cosine", "max_abs_error", "mean_abs_error", "passed")}
              for s in stages if s.get("pass") == "verify"}
    graph = next((s.get("metrics", {}) for s in stages if s.get("pass") == "cuda_graph"), {})
    bench = next((s.get("metrics", {}) for s in stages if s.get("pass") == "benchmark"), {})
    return {"status": report.get("status"), "target": report.get("target"), "runtime": report.get("runtime"),
            "error": report.get("error"), "verify": verify, "cuda_graph_per_shape": graph.get("per_shape"),
            "benchmark": bench.get("batch"),
            "stages": [{"node": s["node"], "status": s.get("status"), "seconds": s.get("seconds")} for s in stages]}


def summarize(results: Path) -> dict[str, Any]:
    """Everything a results folder holds, in one document (missing pieces are ``None``, never an error)."""
    results = Path(results)

    def load(p: Path) -> Any:
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    builds = {p.name.removesuffix(".report.json"): _build_digest(doc)
              for p in sorted(results.glob("*.report.json")) if isinstance(doc := load(p), dict)}
    steps = read_steps(results / "steps.jsonl")
    return {"steps": steps, "ok": bool(steps) and all(s.get("rc") == 0 for s in steps),
            "target": (results / "target.txt").read_text().strip() if (results / "target.txt").is_file() else None,
            "versions": load(results / "versions.json"), "pytest": junit_counts(results / "pytest.xml"),
            "builds": builds, "bench": load(results / "bench.json")}


def _f(v: Any, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def summary_markdown(doc: dict[str, Any]) -> str:
    """A human summary of :func:`summarize`'s document (markdown)."""
    v = doc.get("versions") or {}
    gpu = (v.get("nvidia_smi") or [{}])[0] if v.get("nvidia_smi") else {}
    lines = ["# GPU validation run", "",
             f"* result: **{'all steps passed' if doc.get('ok') else 'some steps failed'}**",
             f"* target: `{doc.get('target')}`",
             f"* GPU: {gpu.get('name', '-')} (compute capability {gpu.get('compute_cap', '-')}, "
             f"driver {gpu.get('driver_version', '-')})",
             f"* torch {v.get('torch', '-')} (CUDA {v.get('torch_cuda', '-')}, cuDNN {v.get('cudnn', '-')}), "
             f"Python {v.get('python', '-')}"]
    if doc.get("pytest"):
        p = doc["pytest"]
        lines.append(f"* pytest -m cuda: {p['passed']} passed, {p['failures']} failed, {p['errors']} errors, "
                     f"{p['skipped']} skipped")
    lines += ["", "## Steps", "", "| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {s.get('step', s.get('raw'))} | {s.get('rc')} | {_f(s.get('seconds'), '.1f')} |"
              for s in doc.get("steps", [])]
    for name, b in (doc.get("builds") or {}).items():
        lines += ["", f"## {name}: {b.get('status')} ({b.get('target')}/{b.get('runtime')})", ""]
        if b.get("error"):
            lines.append(f"error: `{b['error'].get('type')}`: {b['error'].get('message')}")
            lines.append("")
        for node, m in (b.get("verify") or {}).items():
            lines.append(f"* {node}: " + ", ".join(f"{k} {_f(x, '.5f')}" for k, x in m.items() if k != "passed"))
        for bs, m in (b.get("cuda_graph_per_shape") or {}).items():
            lines.append(f"* cuda_graph batch {bs}: eager p50 {_f(m.get('eager_p50_ms'))} ms, graph p50 "
                         f"{_f(m.get('graph_p50_ms'))} ms, speed-up {_f(m.get('speedup'), '.2f')}x, "
                         f"bitwise equal {m.get('bitwise_equal')}")
    bench = doc.get("bench") or {}
    if bench:
        lines += ["", "## Latency through accelc.runtime.load (host wall time, GPU synchronised per call)", "",
                  "| build | batch | eager p50 ms | graph p50 ms | speed-up | replay equals eager | bitwise |",
                  "|---|---|---|---|---|---|---|"]
        for name, per in bench.get("builds", {}).items():
            if "error" in per:
                lines.append(f"| {name} | - | error: {per['error']} | | | | |")
                continue
            for bs, m in per.items():
                if "error" in m:
                    lines.append(f"| {name} | {bs} | {m['error']} | | | | |")
                    continue
                lines.append(f"| {name} | {bs} | {_f(m['eager']['p50_ms'])} | {_f(m['graph']['p50_ms'])} | "
                             f"{_f(m['speedup_p50'], '.2f')}x | {m['outputs']['equal']} | "
                             f"{m['outputs']['bitwise_equal']} |")
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring). Exits 2 on bad arguments, as argparse does."""
    ap = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("target", help="accelc target for this GPU")
    t.add_argument("--cc", type=parse_capability, help="compute capability (default: torch's device 0)")
    w = sub.add_parser("missing-wheels", help="carried wheels whose distribution is not installed")
    w.add_argument("directory", type=Path)
    v = sub.add_parser("versions", help="write versions.json")
    v.add_argument("out", type=Path)
    v.add_argument("--nvidia-smi", type=Path, help="file holding nvidia-smi's CSV query output")
    b = sub.add_parser("bench", help="time builds with and without CUDA-graph replay")
    b.add_argument("out", type=Path)
    b.add_argument("--build", action="append", default=[], metavar="NAME=DIR", required=True,
                   help="a build's out dir (repeatable)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    b.add_argument("--iterations", type=int, default=200)
    b.add_argument("--warmup", type=int, default=20)
    s = sub.add_parser("summary", help="write summary.json and summary.md into a results folder")
    s.add_argument("results", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "bench":
        for spec in args.build:
            if "=" not in spec or not spec.split("=", 1)[0]:
                ap.error(f"--build expects NAME=DIR, got {spec!r}")
        if args.iterations < 1 or args.warmup < 0 or any(x < 1 for x in args.batch_sizes):
            ap.error("--iterations must be >= 1, --warmup >= 0, batch sizes >= 1")
    return args


def _bench(args: argparse.Namespace) -> int:
    import torch

    import accelc.runtime as rt

    doc: dict[str, Any] = {"batch_sizes": args.batch_sizes, "iterations": args.iterations, "warmup": args.warmup,
                           "target_speedup_b1": TARGET_SPEEDUP_B1, "builds": {}}
    failed = False
    for spec in args.build:
        name, directory = spec.split("=", 1)
        try:
            pred = rt.load(directory)
            per = bench_predictor(pred, args.batch_sizes, args.iterations, args.warmup,
                                  lambda p=pred: torch.cuda.synchronize(p.device))
            failed = failed or any("error" in m or not m["outputs"]["equal"] for m in per.values())
        except Exception as e:  # one build's failure must not lose the others' timings
            per = {"error": f"{type(e).__name__}: {e}"}
            failed = True
        doc["builds"][name] = per
        write_json(args.out, doc)  # after every build, so a later crash keeps what was measured
    b1 = doc["builds"].get("resnet18_cuda_fp16", {}).get("1", {})
    doc["resnet18_b1_meets_target"] = (b1.get("speedup_p50") or 0) >= TARGET_SPEEDUP_B1 and bool(
        b1.get("outputs", {}).get("equal"))
    write_json(args.out, doc)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cmd == "target":
        if args.cc is None:
            import torch

            if not torch.cuda.is_available():
                print("cuda")  # the generic profile; the build then reports what is missing
                return 0
            args.cc = torch.cuda.get_device_capability(0)
        print(target_for_capability(*args.cc))
        return 0
    if args.cmd == "missing-wheels":
        for p in missing_wheels(args.directory, installed_distributions()):
            print(p)
        return 0
    if args.cmd == "versions":
        text = args.nvidia_smi.read_text() if args.nvidia_smi and args.nvidia_smi.is_file() else None
        write_json(args.out, collect_versions(text))
        return 0
    if args.cmd == "bench":
        return _bench(args)
    doc = summarize(args.results)
    write_json(args.results / "summary.json", doc)
    write_text(args.results / "summary.md", summary_markdown(doc))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
