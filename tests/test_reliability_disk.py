"""Disk and limits: a size limit with least-recently-used eviction (``accelc cache gc``,
``$ACCELC_CACHE_MAX_MIB``), debris from killed builds swept, and a clear error when the disk
fills up during a write, with nothing half-written kept.

How each test was checked to fail without its mechanism:

* LRU: without the ``touch`` on a cache hit in ``Executor._ensure``, the warm build's
  intermediate entries keep their old times and ``gc`` evicts them first;
* verify is not use: with ``verify_all`` opening entries with ``touch=True`` (as before),
  every entry's time moves;
* the build-time limit: without ``store.gc(limit, keep=...)`` in ``build``, nothing is evicted;
* sweep: ``gc`` used to skip entry dirs without a readable meta.json and never looked in ``tmp/``;
* ENOSPC: without the ``is_no_space`` mapping a pass's full disk was a generic ``PassError``;
  without ``OutputError`` a full out dir was an ``OSError`` traceback with a ``.tmp`` file left;
  a publish that fails leaves the previous generation current, whose ``accelc.lock`` describes
  the files beside it (before generations, the old lock was removed first).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib

import pytest
from click.testing import CliRunner

from accelc.build import OutputError, build
from accelc.cache import Store
from accelc.cli import main
from accelc.errors import CacheError


def _entry_bytes(store: Store, keys: set[str]) -> int:
    return sum(e.size_bytes for e in store.list() if e.key in keys)


def test_gc_evicts_least_recently_used_and_cache_hits_count_as_use(
    reliability_project, reliability_golden, reliability_warm_cache, tmp_path
):
    g = reliability_golden.int8
    store = Store(reliability_warm_cache)
    other = build(
        reliability_project.write_recipe(
            tmp_path, "other", model={**reliability_project.recipe_dict()["model"], "seed": 1}
        ),
        out_dir=tmp_path / "out_other",
        cache_dir=reliability_warm_cache,
    )
    assert other.ok, other.result.failure
    a_keys = set(g.keys.values())
    other_only = (
        {s["artifact"]["key"] for s in other.report["stages"]} - a_keys - set(reliability_golden.fp32.keys.values())
    )
    assert len(other_only) >= 8  # a different model: everything but the data differs

    # Make the golden INT8 entries the *oldest*, then use them through a warm build.
    for i, e in enumerate(sorted(store.list(), key=lambda e: e.key in a_keys, reverse=True)):
        os.utime(e.path, (1_000_000 + i, 1_000_000 + i))
    warm = build(g.recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache)
    assert warm.ok and all(s["cached"] for s in warm.report["stages"])

    # Verifying the store is not use: the order stays as it is.
    before = {e.key: e.path.stat().st_mtime for e in store.list()}
    assert store.verify_all() == []
    assert {e.key: e.path.stat().st_mtime for e in store.list()} == before

    limit = _entry_bytes(store, a_keys)
    r = CliRunner().invoke(
        main, ["cache", "gc", "--cache-dir", str(reliability_warm_cache), "--max-size", str(limit / 2**20)]
    )
    assert r.exit_code == 0, r.output
    left = {e.key for e in store.list()}
    assert a_keys <= left, "entries the last build used were evicted"
    assert not (other_only & left), "least-recently-used entries were kept"
    assert store.total_bytes() <= limit


def test_build_enforces_the_size_limit_and_keeps_what_it_used(
    reliability_golden, reliability_warm_cache, tmp_path, monkeypatch
):
    store = Store(reliability_warm_cache)
    fp32_only = set(reliability_golden.fp32.keys.values()) - set(reliability_golden.int8.keys.values())
    assert fp32_only and fp32_only <= {e.key for e in store.list()}
    monkeypatch.setenv("ACCELC_CACHE_MAX_MIB", "0")
    outcome = build(reliability_golden.int8.recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache)
    assert outcome.ok
    assert {e.key for e in store.list()} == set(reliability_golden.int8.keys.values())


def test_size_limit_must_be_a_number(reliability_golden, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELC_CACHE_MAX_MIB", "lots")
    with pytest.raises(CacheError, match="ACCELC_CACHE_MAX_MIB"):
        build(reliability_golden.int8.recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")


def test_gc_sweeps_what_killed_builds_left_but_not_a_live_builders_staging(tmp_path):
    store = Store(tmp_path / "cache")
    orphan = store.tmp / ("a" * 64 + ".deadbeef")
    orphan.mkdir()
    (orphan / "model.onnx").write_bytes(b"half")
    live = store.staging("b" * 64)
    broken = store.entries / ("c" * 64)
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"no meta")
    with store.lock("b" * 64):
        r = CliRunner().invoke(main, ["cache", "gc", "--cache-dir", str(store.root), "--max-size", "100"])
        assert r.exit_code == 0, r.output
        assert not orphan.exists() and not broken.exists()
        assert live.exists()


def test_pass_that_hits_a_full_disk_fails_clearly_and_keeps_nothing(reliability_golden, tmp_path, monkeypatch):
    import numpy as np

    real_savez = np.savez

    def savez_on_full_disk(file, *args, **kwds):
        real_savez(file, *args, **kwds)
        with open(file, "r+b") as f:
            f.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(np, "savez", savez_on_full_disk)
    g = reliability_golden.int8
    cache = tmp_path / "cache"
    outcome = build(g.recipe, out_dir=tmp_path / "out", cache_dir=cache)
    err = outcome.result.failure
    assert isinstance(err, CacheError) and err.exit_code == 6
    assert "disk full" in str(err) and "load_data[calibration]" in str(err)
    store = Store(cache)
    assert store.lookup(g.keys["load_data[calibration]"]) is None
    assert list(store.tmp.iterdir()) == []
    assert store.verify_all() == []


def test_commit_on_a_full_disk_fails_clearly_and_keeps_nothing(reliability_golden, tmp_path, monkeypatch):
    real_write_text = pathlib.Path.write_text

    def write_text(self, data, *a, **kw):
        if self.name == "meta.json":
            real_write_text(self, data[: len(data) // 2], *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, data, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    cache = tmp_path / "cache"
    outcome = build(reliability_golden.int8.recipe, out_dir=tmp_path / "out", cache_dir=cache)
    monkeypatch.undo()
    err = outcome.result.failure
    assert isinstance(err, CacheError) and "disk full while writing cache entry" in str(err)
    store = Store(cache)
    assert list(store.entries.iterdir()) == [] and list(store.tmp.iterdir()) == []


def test_full_out_dir_fails_clearly_and_leaves_no_half_written_file(
    reliability_golden, reliability_warm_cache, tmp_path, monkeypatch
):
    import accelc.executor as executor

    out = tmp_path / "out"
    assert build(reliability_golden.int8.recipe, out_dir=out, cache_dir=reliability_warm_cache).ok
    assert (out / "accelc.lock").is_file()  # a previous build's lock, about to go stale
    real_copy = executor.shutil.copyfile

    def copy_to_full_disk(src, dst, *a, **kw):
        real_copy(src, dst, *a, **kw)
        with open(dst, "r+b") as f:
            f.truncate(7)
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(executor.shutil, "copyfile", copy_to_full_disk)
    with pytest.raises(OutputError, match="disk full") as e:
        build(reliability_golden.int8.recipe, out_dir=out, cache_dir=reliability_warm_cache)
    assert e.value.exit_code == 6
    lock = json.loads((out / "accelc.lock").read_text())  # the previous generation stays whole and current
    assert lock["final"]["digest"] == reliability_golden.int8.report["final_digest"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(list((out / ".accelc" / "generations").iterdir())) == 1  # the failed one's is removed
    assert (out / "model.onnx").read_bytes() == reliability_golden.int8.final_bytes  # never half-written
    r = CliRunner().invoke(main, ["cache", "verify", "--cache-dir", str(reliability_warm_cache)])
    assert r.exit_code == 0  # the cache is untouched
