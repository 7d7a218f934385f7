"""Non-finite data: NaN or Inf never satisfies a tolerance. Non-finite inputs are refused at
``load_data`` (exit 2, naming the file and samples); non-finite outputs fail verification
(exit 5) with the number of affected samples.

How each test was checked to fail without its mechanism (on the main branch before this change):
``v < bound`` is False for NaN, so a NaN metric met every tolerance; rows with a NaN had a
NaN norm, ``denom > 0`` was False and they counted as cosine 1.0; ``load_data`` stored NaN inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from accelc.build import build
from accelc.errors import DataError, VerificationError
from accelc.passes.verification import compare_outputs, tolerance_failures

NAN_MODEL = '''
import torch
from torch import nn


class NanNet(nn.Module):
    """(N, 3, 32, 32) -> (N, 10); rows whose first input value is positive are NaN."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        y = self.fc(x.mean((2, 3)))
        return torch.where(x[:, :1, 0, 0] > 0, torch.full_like(y, float("nan")), y)
'''


def test_nan_never_satisfies_a_tolerance():
    assert tolerance_failures({"cosine": float("nan")}, {"cosine": 0.9})
    assert tolerance_failures({"max_abs_error": float("nan")}, {"max_abs_error": 1.0})
    assert tolerance_failures({"cosine": None}, {"cosine": 0.9})
    assert not tolerance_failures({"cosine": 0.95}, {"cosine": 0.9})


def test_non_finite_rows_are_counted_and_fail_verification():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 10)).astype(np.float32)
    out = ref.copy()
    out[1, 3] = np.nan
    out[4, 0] = np.inf
    m = compare_outputs(ref, out)
    assert m["nonfinite_samples"] == 2 and m["samples"] == 6
    assert m["cosine"] == pytest.approx(1.0)  # the finite rows agree ...
    failures = tolerance_failures(m, {"cosine": 0.9})
    assert failures and "2 of 6 samples have non-finite outputs" in failures[0]  # ... and the build still fails
    assert tolerance_failures(m, {})  # with no tolerance at all


def test_non_finite_inputs_are_refused_at_load_data(reliability_project, reliability_warm_cache, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    x[3, 0, 5, 5] = np.nan
    x[6, 2, 0, 0] = np.inf
    np.savez(tmp_path / "val_nan.npz", input=x, labels=rng.integers(0, 10, 8))
    recipe = reliability_project.write_recipe(
        tmp_path,
        "tiny_nan_input",
        data={
            "calibration": {"tensors": str(reliability_project.root / "cal.npz")},
            "validation": {"tensors": str(tmp_path / "val_nan.npz")},
        },
    )
    outcome = build(recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache)
    err = outcome.result.failure
    assert isinstance(err, DataError) and err.exit_code == 2, err
    assert "val_nan.npz" in str(err) and "2 of 8 samples" in str(err) and "sample 3, 6" in str(err)


def test_non_finite_outputs_fail_the_build_with_exit_5(reliability_project, tmp_path):
    (tmp_path / "nan_model_i14.py").write_text(NAN_MODEL)
    recipe = reliability_project.write_recipe(
        tmp_path,
        "tiny_nan_output",
        model={"source": "python", "callable": "nan_model_i14:NanNet", "path": str(tmp_path)},
        precision="fp32",
        verify={"tolerances": {"cosine": 0.5}},
    )
    outcome = build(recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    err = outcome.result.failure
    assert isinstance(err, VerificationError) and err.exit_code == 5, err
    samples = np.load(reliability_project.root / "val.npz")["input"]
    expected = int((samples[:, 0, 0, 0] > 0).sum())
    assert 0 < expected < len(samples)
    assert f"{expected} of {len(samples)} samples have non-finite outputs" in str(err)
    assert outcome.report["status"] == "failed"
