"""``deploy.json``: what an application needs to run a build's artifact, written next to it.

The out dir of a successful build holds the deployed files, ``report.json``, ``report.md``,
``accelc.lock`` and ``deploy.json``, which :func:`accelc.runtime.load` reads:

- ``artifact``, ``files``, ``kind``, ``digest``, ``meta``: the primary file a runtime opens, every
  payload file, the artifact kind (which picks the runtime plugin that loads it), its tree
  digest and what the producing pass recorded (input names, dtypes, inference precision);
- ``runtime``, ``device``, ``target``, ``precision``;
- ``inputs``: the input signature (name, shape, dtype, dynamic axes), in model order;
- ``preprocess``: for an image recipe, the ``images`` source's evaluation transform
  (``{"input", "resize", "crop", "mean", "std"}``), applied by ``predictor.preprocess``;
- ``labels``: ``"imagenet1k"`` for an image recipe: a 1000-way output of an image model is an
  ImageNet-1k classifier's in practice (torchvision's, timm's, EfficientNet-Lite's, whatever their
  mean/std), so the predictor names those classes; any other output is shown by index;
- ``recipe``: the resolved recipe (defaults filled in, paths absolute) and the lowered pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import RuntimeLoadError

#: File name of the deployment manifest inside an out dir.
DEPLOY_NAME = "deploy.json"
#: Bumped when a field changes meaning; :func:`read_deploy` refuses a newer format.
DEPLOY_FORMAT = 1


def image_preprocessing(recipe: Any) -> dict[str, Any] | None:
    """The ``images`` transform of the recipe's validation set (else its calibration set), with
    the input it feeds; ``None`` when no dataset is an ``images`` one."""
    from .sources.data import preprocess_settings

    for role in ("validation", "calibration"):
        spec = (recipe.data or {}).get(role)
        if spec and spec.get("source") == "images":
            name = spec.get("input") or recipe.signature.inputs[0].name
            return {"input": name, "source": "images", "from": f"data.{role}", **preprocess_settings(spec)}
    return None


def deploy_manifest(ex: Any, result: Any, report: dict[str, Any]) -> dict[str, Any] | None:
    """The ``deploy.json`` document for a build, or ``None`` when it deployed nothing (failed)."""
    if result.final is None or not report.get("final_artifact"):
        return None
    g = ex.graph
    r = g.recipe
    pre = image_preprocessing(r)
    kind = getattr(ex.registry, "kinds", {}).get(result.final.kind)
    device = g.target.device if kind is not None and kind.device_bound else "cpu"
    return {
        "format": DEPLOY_FORMAT,
        "artifact": report["final_artifact"],
        "files": report["final_files"],
        "kind": result.final.kind,
        "digest": result.final.digest,
        "meta": json.loads(json.dumps(result.final.meta, default=str)),
        "runtime": g.runtime,
        "device": device,
        "target": g.target.name,
        "precision": r.precision,
        "inputs": r.signature.to_json(),
        "preprocess": pre,
        "labels": "imagenet1k" if pre is not None else None,
        "recipe": {
            "name": r.name,
            "file": str(r.file),
            "model": r.model,
            "inputs": r.signature.to_json(),
            "target": g.target.name,
            "runtime": g.runtime,
            "precision": r.precision,
            "data": r.data,
            "verify": r.verify,
            "benchmark": r.benchmark,
            "pipeline": [{"node": n.id, "pass": n.pass_name, "options": n.options} for n in g.nodes],
        },
    }


def read_deploy(directory: Path) -> dict[str, Any] | None:
    """``deploy.json`` of an out dir, or ``None`` when there is none.

    Raises:
        RuntimeLoadError: the file is not JSON, lacks a field the loader needs, or is of a
            newer format than this accelc reads.
    """
    path = Path(directory) / DEPLOY_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RuntimeLoadError(f"{path}: not readable as JSON: {e}") from e
    missing = [k for k in ("artifact", "kind", "inputs") if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise RuntimeLoadError(f"{path}: missing {', '.join(missing)} (write it with accelc build)")
    if int(doc.get("format", 1)) > DEPLOY_FORMAT:
        raise RuntimeLoadError(f"{path}: format {doc['format']} is newer than this accelc reads ({DEPLOY_FORMAT})")
    return doc
