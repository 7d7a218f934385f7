"""Shared pytest fixtures.

Fixtures for the reliability suite (``tests/test_reliability_*.py``) are the ``reliability_*``
functions below. They build a tiny project once per session (a two-conv model module, tensor
data, recipes written by the tests) so that build tests stay fast:

* :func:`reliability_project`: the project directory and a recipe writer;
* :func:`reliability_golden`: serial reference builds of the INT8 and FP32 recipes (their
  cache, reports and final artifact bytes), built once per session;
* :func:`reliability_warm_cache`: a private copy of the golden cache for one test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

#: Model module for the reliability suite. ``ACCELC_TEST_MODEL_SLEEP`` (seconds) makes the
#: constructor slow, so concurrent builds surely overlap inside ``load_model``; it does not
#: change the model, hence not the cache keys.
RELIABILITY_MODEL_MODULE = '''
"""Tiny model for accelc's reliability tests: (N, 3, 32, 32) float32 -> (N, 10)."""
import os
import time

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        time.sleep(float(os.environ.get("ACCELC_TEST_MODEL_SLEEP", "0")))
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))
'''
RELIABILITY_MODULE_NAME = "accelc_reliability_tinynet"


@dataclass
class ReliabilityProject:
    """The session's tiny project: model module and data under ``root`` (absolute paths).

    ``recipe_dict(**over)`` is a complete CPU recipe (INT8 unless ``precision`` is given);
    ``write_recipe(dir, name, **over)`` writes it as ``dir/name.yaml``. Top-level keys in
    ``over`` replace the base recipe's; a value of ``None`` removes the key.
    """

    root: Path

    def recipe_dict(self, name: str = "tiny", **over: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "name": name,
            "model": {"source": "python", "callable": f"{RELIABILITY_MODULE_NAME}:TinyNet", "path": str(self.root)},
            "inputs": [{"name": "input", "shape": [1, 3, 32, 32]}],
            "target": "cpu",
            "precision": "int8",
            "data": {
                "calibration": {"tensors": str(self.root / "cal.npz")},
                "validation": {"tensors": str(self.root / "val.npz")},
            },
            "verify": {"tolerances": {"cosine": 0.9}},
            "benchmark": {"batch_sizes": [1], "warmup": 1, "iterations": 3, "threads": 1},
        }
        for k, v in over.items():
            if v is None:
                base.pop(k, None)
            else:
                base[k] = copy.deepcopy(v)
        return base

    def write_recipe(self, directory: Path, name: str = "tiny", **over: Any) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(self.recipe_dict(name, **over), sort_keys=False))
        return path


@pytest.fixture(scope="session")
def reliability_project(tmp_path_factory: pytest.TempPathFactory) -> ReliabilityProject:
    """The tiny model module plus ``cal.npz`` (8 samples) and ``val.npz`` (8 samples, labels)."""
    root = tmp_path_factory.mktemp("reliability_project")
    (root / f"{RELIABILITY_MODULE_NAME}.py").write_text(RELIABILITY_MODEL_MODULE)
    rng = np.random.default_rng(0)
    np.savez(root / "cal.npz", input=rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    np.savez(
        root / "val.npz",
        input=rng.standard_normal((8, 3, 32, 32)).astype(np.float32),
        labels=rng.integers(0, 10, 8),
    )
    return ReliabilityProject(root)


@dataclass
class GoldenBuild:
    """One serial reference build: its recipe, report, final artifact bytes and sha256."""

    recipe: Path
    out_dir: Path
    report: dict[str, Any]
    final_bytes: bytes

    @property
    def final_sha256(self) -> str:
        return hashlib.sha256(self.final_bytes).hexdigest()

    @property
    def keys(self) -> dict[str, str]:
        """Node id -> cache key."""
        return {s["node"]: s["artifact"]["key"] for s in self.report["stages"]}

    @property
    def digests(self) -> dict[str, str]:
        """Node id -> artifact digest."""
        return {s["node"]: s["artifact"]["digest"] for s in self.report["stages"]}


@dataclass
class Golden:
    """Serial reference builds sharing one cache: ``int8`` and ``fp32`` (which overlap up to onnxsim)."""

    cache: Path
    int8: GoldenBuild
    fp32: GoldenBuild


@pytest.fixture(scope="session")
def reliability_golden(reliability_project: ReliabilityProject, tmp_path_factory: pytest.TempPathFactory) -> Golden:
    """Serial, in-process builds of the tiny INT8 and FP32 recipes into one cache (once per session).

    Tests must not modify ``cache``; use :func:`reliability_warm_cache` for a private copy.
    """
    from accelc.build import build

    root = tmp_path_factory.mktemp("reliability_golden")
    cache = root / "cache"
    builds = {}
    for precision in ("int8", "fp32"):
        recipe = reliability_project.write_recipe(root, f"tiny_{precision}", precision=precision)
        out = root / f"out_{precision}"
        outcome = build(recipe, out_dir=out, cache_dir=cache)
        assert outcome.ok, outcome.result.failure
        final = (out / outcome.report["final_artifact"]).read_bytes()
        builds[precision] = GoldenBuild(recipe, out, json.loads(json.dumps(outcome.report)), final)
    return Golden(cache, builds["int8"], builds["fp32"])


@pytest.fixture
def reliability_warm_cache(reliability_golden: Golden, tmp_path: Path) -> Path:
    """A private copy of the golden cache (every INT8 and FP32 entry present) at ``tmp_path/cache``."""
    dst = tmp_path / "cache"
    shutil.copytree(reliability_golden.cache, dst, copy_function=shutil.copy2)
    return dst
