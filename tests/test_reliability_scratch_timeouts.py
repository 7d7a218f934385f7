"""Scratch space and timeouts: every scratch directory lives under the cache root, so ``accelc
cache gc`` reclaims what a killed build left; ``locks/`` shrinks with eviction; user code that
never returns and lock waits that never end stop the build, saying which node and lock.

How each test was checked to fail without its mechanism (on the main branch before this change):
``--no-cache`` used ``$TMPDIR/accelc-nocache-*`` and calibrate ``$TMPDIR/accelc-calib-*``, which
nothing swept; ``gc`` never removed ``locks/<key>.lock``; a model callable that slept held the
key's lock for as long as it slept (there was no ``--user-code-timeout``); a lock wait had no limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from accelc.build import build, plan
from accelc.cache import Store
from accelc.errors import BuildTimeoutError, LockTimeoutError


class _Stop(Exception):
    pass


class _Recorder:
    """A reporter that records notices and, optionally, what ``look`` returns when the first stage starts."""

    def __init__(self, look=None, stop: bool = False):
        self.look, self.stop, self.seen, self.notices = look, stop, None, []

    def stage_started(self, node_id, pass_name):
        if self.look is not None and self.seen is None:
            self.seen = self.look()
            if self.stop:
                raise _Stop

    def stage_progress(self, node_id, message):
        pass

    def stage_finished(self, node_id, cached, seconds, metrics):
        pass

    def notice(self, message):
        self.notices.append(message)


def test_no_cache_store_is_scratch_under_the_cache_root(reliability_golden, tmp_path):
    cache = tmp_path / "cache"
    rec = _Recorder(look=lambda: sorted(p.name for p in (cache / "scratch").iterdir()), stop=True)
    with pytest.raises(_Stop):
        build(reliability_golden.int8.recipe, out_dir=tmp_path / "out", cache_dir=cache, no_cache=True, reporter=rec)
    dirs = [n for n in rec.seen if not n.endswith(".lock")]
    assert len(dirs) == 1 and dirs[0].startswith(f"nocache-{os.getpid()}-")
    assert list((cache / "scratch").iterdir()) == []  # removed when the build ends, even by an exception
    assert list((cache / "entries").iterdir()) == []  # nothing entered the shared store


_KILLED_SCRATCH = """
import os, signal, sys
from accelc.cache import Store
with Store(sys.argv[1]).scratch("nocache") as d:
    (d / "entries").mkdir()
    (d / "entries" / "big").write_bytes(b"\\0" * 65536)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_gc_reclaims_the_scratch_of_a_killed_build_but_not_a_live_one(tmp_path):
    cache = tmp_path / "cache"
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_SCRATCH), str(cache)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    store = Store(cache)
    assert any(d.name.startswith("nocache-") for d in store.scratch_root.iterdir())
    with store.scratch("live") as live:
        removed = store.gc(0)
        del removed
        assert live.is_dir()  # its owner (this process) holds its lock
        assert [d.name for d in store.scratch_root.iterdir() if not d.name.endswith(".lock")] == [live.name]
    assert list(store.scratch_root.iterdir()) == []


def test_calibration_temp_files_are_under_the_cache_root(reliability_golden, reliability_warm_cache, tmp_path,
                                                        monkeypatch):
    store = Store(reliability_warm_cache)
    store.evict(reliability_golden.int8.keys["calibrate"])
    real = tempfile.TemporaryDirectory
    dirs: list[str | None] = []

    def spy(*a, **kw):
        dirs.append(str(kw.get("dir")) if kw.get("dir") is not None else None)
        return real(*a, **kw)

    import accelc.passes.quantization as quantization

    monkeypatch.setattr(quantization.tempfile, "TemporaryDirectory", spy)
    outcome = build(reliability_golden.int8.recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache)
    monkeypatch.undo()
    assert outcome.ok and [s["node"] for s in outcome.report["stages"] if not s["cached"]] == ["calibrate"]
    assert dirs and all(d is not None and Path(d).is_relative_to(store.tmp) for d in dirs), dirs
    assert list(store.tmp.iterdir()) == []  # and removed with the staging dir


def test_gc_removes_the_lock_files_of_evicted_entries(reliability_golden, reliability_warm_cache):
    store = Store(reliability_warm_cache)
    keys = {e.key for e in store.list()}
    assert {p.name[: -len(".lock")] for p in store.locks.glob("*.lock")} >= keys  # one lock file per built entry
    assert set(store.gc(0)) == keys
    assert list(store.locks.iterdir()) == []


def test_user_code_that_never_returns_times_out_and_frees_its_lock(reliability_golden, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "ACCELC_TEST_MODEL_SLEEP": "600"}  # the model's constructor sleeps for 10 minutes
    cmd = [sys.executable, "-m", "accelc.cli", "build", str(reliability_golden.fp32.recipe), "--out",
           str(tmp_path / "out"), "--cache-dir", str(cache), "--user-code-timeout", "3"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 4, p.stderr[-3000:]
    assert "load_model" in p.stderr and "did not return within 3 s" in p.stderr, p.stderr[-3000:]
    key = reliability_golden.fp32.keys["load_model"]
    with Store(cache).lock(key, timeout=0):  # free again: no later build waits on it
        pass
    assert Store(cache).lookup(key) is None


def test_in_process_user_code_timeout_is_a_pass_failure(reliability_golden, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELC_TEST_MODEL_SLEEP", "20")
    outcome = build(reliability_golden.fp32.recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                    user_code_timeout=0.5)
    assert isinstance(outcome.result.failure, BuildTimeoutError) and outcome.result.failure.exit_code == 4
    assert outcome.report["status"] == "failed"


def test_a_lock_wait_names_the_node_and_lock_and_gives_up(reliability_golden, tmp_path):
    cache = tmp_path / "cache"
    recipe = reliability_golden.fp32.recipe
    _, nodes = plan(recipe, cache_dir=cache)
    key = next(n.key for n in nodes if n.id == "load_model")
    rec = _Recorder()
    with Store(cache).lock(key):  # another build computing load_model
        outcome = build(recipe, out_dir=tmp_path / "out", cache_dir=cache, reporter=rec, lock_timeout=0.5)
    err = outcome.result.failure
    lock_file = str(cache / "locks" / f"{key}.lock")
    assert isinstance(err, LockTimeoutError) and "load_model" in str(err) and lock_file in str(err), err
    assert any("waiting for lock" in n and lock_file in n and "load_model" in n for n in rec.notices), rec.notices


def test_a_wait_for_the_out_dir_lock_gives_up_too(reliability_golden, reliability_warm_cache, tmp_path):
    from filelock import FileLock

    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / ".accelc-out.lock")):  # another build publishing there
        with pytest.raises(LockTimeoutError, match="publishing into"):
            build(reliability_golden.int8.recipe, out_dir=out, cache_dir=reliability_warm_cache, lock_timeout=0.5)
    assert build(reliability_golden.int8.recipe, out_dir=out, cache_dir=reliability_warm_cache, lock_timeout=0.5).ok
    with FileLock(str(out / ".accelc-out.lock"), timeout=0):  # released after publishing
        pass
