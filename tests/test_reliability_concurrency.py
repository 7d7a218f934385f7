"""Concurrency: several ``accelc build`` processes started at once, on the same and on overlapping
recipes and sharing one cache, all succeed; each cache entry is computed once (the others wait
on its lock, then reuse it) and every final artifact matches a serial build's.

Checked to fail without the mechanism: with ``Executor._ensure`` not taking ``store.lock(key)``
(a ``contextlib.nullcontext`` instead), every process runs the slow ``load_model`` itself and
the "computed exactly once" assertion fails (4 builders of the load_model entry).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

from accelc.cache import Store


def test_concurrent_builds_share_the_cache_compute_each_entry_once_and_match_serial(
    reliability_project, reliability_golden, tmp_path
):
    int8 = reliability_project.write_recipe(tmp_path, "tiny_int8", precision="int8")
    fp32 = reliability_project.write_recipe(tmp_path, "tiny_fp32", precision="fp32")
    cache = tmp_path / "cache"
    jobs = [  # (recipe, out dir, golden build); two processes publish into the same out dir
        (int8, tmp_path / "out_a", reliability_golden.int8),
        (int8, tmp_path / "out_a", reliability_golden.int8),
        (int8, tmp_path / "out_b", reliability_golden.int8),
        (fp32, tmp_path / "out_c", reliability_golden.fp32),
    ]
    # load_model sleeps 2 s, so all processes reach it while the first one holds its lock
    env = {**os.environ, "ACCELC_TEST_MODEL_SLEEP": "2", "COLUMNS": "200", "ACCELC_CACHE_DIR": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "accelc.cli", "build", str(r), "--out", str(o), "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, o, _ in jobs
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(stdout) for stdout, _ in results]

    built = Counter(s["artifact"]["key"] for rep in reports for s in rep["stages"] if not s["cached"])
    used = {s["artifact"]["key"] for rep in reports for s in rep["stages"]}
    assert set(built) == used, "some entry was never built by anyone"
    assert all(n == 1 for n in built.values()), f"entries computed more than once: {built}"
    load_model = reports[0]["stages"][0]["artifact"]["key"]
    assert sum(s["cached"] for rep in reports for s in rep["stages"] if s["artifact"]["key"] == load_model) == 3

    for rep, (_, out, golden) in zip(reports, jobs, strict=True):
        assert rep["final_digest"] == golden.report["final_digest"]
        assert hashlib.sha256((out / rep["final_artifact"]).read_bytes()).hexdigest() == golden.final_sha256
        lock = json.loads((out / "accelc.lock").read_text())
        assert lock["final"]["digest"] == golden.report["final_digest"]
    assert Store(cache).verify_all() == []
    assert not [p for o in ("out_a", "out_b", "out_c") for p in (tmp_path / o).iterdir() if p.name.endswith(".tmp")]
