"""Test helpers: write small recipes (tiny model, tensor data) into a temporary directory."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``; a ``None`` value deletes the key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def tiny_recipe_dict(**over: Any) -> dict[str, Any]:
    """A complete CPU INT8 recipe for :class:`TinyConvNet` with tensor data files next to it."""
    base = {
        "name": "tiny",
        "model": {"source": "python", "callable": "tiny_models:TinyConvNet", "path": str(FIXTURES)},
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 32, 32],
                "dynamic": [{"axis": 0, "name": "batch", "min": 1, "opt": 1, "max": 8}],
            }
        ],
        "target": "cpu",
        "precision": "int8",
        "data": {"calibration": {"tensors": "cal.npz"}, "validation": {"tensors": "val.npz"}},
        "verify": {"tolerances": {"cosine": 0.9}},
        "benchmark": {"batch_sizes": [1, 4], "warmup": 1, "iterations": 3},
    }
    return merge(base, over)


def write_tiny_recipe(tmp: Path, name: str = "recipe.yaml", seed: int = 0, **over: Any) -> Path:
    """Write ``cal.npz`` (16 samples), ``val.npz`` (24 samples, with labels) and the recipe; returns its path."""
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if not (tmp / "cal.npz").exists():
        np.savez(tmp / "cal.npz", input=rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    if not (tmp / "val.npz").exists():
        np.savez(
            tmp / "val.npz",
            input=rng.standard_normal((24, 3, 32, 32)).astype(np.float32),
            labels=rng.integers(0, 10, 24),
        )
    path = tmp / name
    path.write_text(yaml.safe_dump(tiny_recipe_dict(**over), sort_keys=False))
    return path


def pip_install_target(package: Path, site: Path) -> Path:
    """``pip install --no-deps --no-build-isolation --target SITE PACKAGE`` (a plugin package from
    tests/, installed as a user would, into a folder the test puts on ``PYTHONPATH``); returns ``site``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(package)],
        check=True,
        capture_output=True,
        text=True,
    )
    return site
