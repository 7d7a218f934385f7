"""Reproducibility: two ``--no-cache`` builds of one recipe in one environment give bit-identical
final artifacts; ``accelc env`` prints the environment fingerprint and reports drift from the
pins of ``environment.yml``.

Which intermediate artifacts are *not* bit-identical, and why (the final artifact is):

* ``benchmark``: its report holds measured latencies; timing is not deterministic.
* ``calibrate``: ONNX Runtime's calibrator collects tensor names in a ``set``, so the JSON
  table lists the same ranges in an order that follows the process's string-hash seed.
  ``quantize`` reads the ranges by name, so the quantized model does not change.

The builds run as separate processes with different ``PYTHONHASHSEED`` values, which is what
exposes the ``calibrate`` ordering. The drift test was checked to fail with ``drift`` reporting
every pin as ``ok``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

from click.testing import CliRunner

from accelc.cli import main

#: Passes whose artifacts may differ between identical builds (see the module docstring).
NONDETERMINISTIC = {"benchmark": "measured latencies", "calibrate": "table order follows the hash seed"}


def test_two_no_cache_builds_give_bit_identical_final_artifacts(reliability_golden, tmp_path):
    recipe = reliability_golden.int8.recipe
    shared = tmp_path / "shared-cache"
    procs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "ACCELC_CACHE_DIR": str(shared), "COLUMNS": "200"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "accelc.cli", "build", str(recipe), "--no-cache", "--out", str(tmp_path / seed)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    a, b = (json.loads((tmp_path / s / "report.json").read_text()) for s in ("1", "2"))

    final = a["final_artifact"]
    assert (tmp_path / "1" / final).read_bytes() == (tmp_path / "2" / final).read_bytes()
    assert (tmp_path / "1" / final).read_bytes() == reliability_golden.int8.final_bytes  # and equal to a cached build
    assert a["final_digest"] == b["final_digest"]
    assert all(not s["cached"] for s in a["stages"] + b["stages"])  # --no-cache rebuilt everything

    differ = {
        s["node"]
        for s, t in zip(a["stages"], b["stages"], strict=True)
        if s["artifact"]["digest"] != t["artifact"]["digest"]
    }
    assert differ <= set(NONDETERMINISTIC), f"unexpected non-deterministic passes: {differ - set(NONDETERMINISTIC)}"
    # --no-cache neither reads nor writes the shared entries; its private store was scratch under the root, now gone
    assert list((shared / "entries").iterdir()) == [] and list((shared / "scratch").iterdir()) == []


def _env(args: list[str]) -> tuple[int, dict, str]:
    r = CliRunner().invoke(main, ["env", *args])
    stdout = r.stdout
    return r.exit_code, json.loads(stdout), r.stderr


def test_env_prints_the_fingerprint_and_reports_drift_from_environment_yml(tmp_path):
    numpy, pluggy = version("numpy"), version("pluggy")
    pins = tmp_path / "environment.yml"
    pins.write_text(
        "name: accelc\nchannels: [conda-forge]\ndependencies:\n"
        f"  - python={sys.version_info.major}.{sys.version_info.minor}\n"
        "  - pip\n"
        "  - pip:\n"
        f"      - numpy=={numpy}\n"
        f"      - pluggy=={pluggy}.post9\n"
        "      - surely-not-installed-accelc-dep==1.0\n"
        "      - -e .\n"
    )
    code, doc, err = _env(["--file", str(pins)])
    assert code == 0
    assert doc["packages"]["numpy"] == numpy and doc["python"] == sys.version.split()[0]
    assert len(doc["fingerprint"]) == 16 and "host" in doc
    drift = {d["name"]: d for d in doc["environment_file"]["drift"]}
    assert set(drift) == {"pluggy", "surely-not-installed-accelc-dep"}
    assert drift["pluggy"]["status"] == "differs" and drift["pluggy"]["installed"] == pluggy
    assert drift["surely-not-installed-accelc-dep"]["status"] == "missing"
    assert "2 of 4 pins" in err and "pluggy: pinned" in err

    strict, _, _ = _env(["--file", str(pins), "--strict"])
    assert strict == 1

    pins.write_text(
        pins.read_text().replace(".post9", "").replace("      - surely-not-installed-accelc-dep==1.0\n", "")
    )
    code, doc, err = _env(["--file", str(pins), "--strict"])
    assert code == 0 and doc["environment_file"]["drift"] == [] and "no drift" in err


def test_env_says_when_there_is_no_environment_yml(tmp_path):
    code, doc, err = _env(["--file", str(tmp_path / "missing.yml")])
    assert code == 0 and doc["environment_file"] is None
    assert "no environment.yml found" in err
