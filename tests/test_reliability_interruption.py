"""Interruption: a build killed (SIGINT or SIGKILL) in the middle of a pass leaves no entry a later
build would trust; the next build completes correctly and reuses every entry that was completed.

* ``test_sigint_in_every_pass``: in process, a real SIGINT is raised inside each pass in turn,
  after the pass wrote its whole output into its staging dir.
* ``test_killed_builds_in_subprocesses``: the real ``accelc build`` command in subprocesses,
  killed with SIGKILL in a pass, SIGKILL inside the commit (after ``meta.json`` was written,
  before the rename), and SIGINT (exit 130).

Checked to fail without the mechanisms (each by mutating a copy of the package):

* staging dir + rename: with ``Store.staging`` handing out ``entries/<key>`` itself (the pass
  writes in place, ``meta.json`` is added there), the SIGKILL steps leave entries that
  ``cache verify`` reports and a commit killed after writing ``meta.json`` is trusted;
* unwinding: without ``Executor._run``'s ``finally`` removing the staging dir, every SIGINT
  leaves it behind;
* the CLI's ``KeyboardInterrupt`` handling: without it, click exits 1 with "Aborted!", not 130.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from accelc.build import build, plan
from accelc.cache import Store
from accelc.plugins.manager import make_plugin_manager
from accelc.registry import build_registry

#: Runs the real ``accelc build`` command with a hook that stops at one point and waits to be killed.
#: ``ACCELC_TEST_STOP`` is ``pass:<node id>`` (after the pass wrote its output, before it returns)
#: or ``commit:<node id>`` (inside ``Store.commit``, after meta.json is written, before the rename).
#: Every committed node is appended to ``ACCELC_TEST_LOG``.
DRIVER = r"""
import json, os, signal, sys, time
from pathlib import Path

# A shell that starts a job in the background without job control (``cmd &`` in a script) sets
# SIGINT to "ignore", and Python keeps that; the build must see Ctrl-C as a user's terminal sends it.
signal.signal(signal.SIGINT, signal.default_int_handler)

import accelc.cache as cache
from accelc.registry import default_registry

where, stop = os.environ["ACCELC_TEST_STOP"].split(":", 1)
ready, log = Path(os.environ["ACCELC_TEST_READY"]), Path(os.environ["ACCELC_TEST_LOG"])


def wait_to_be_killed():
    ready.write_text(str(os.getpid()))
    time.sleep(120)
    sys.exit("not killed")


def wrap(p):
    run = p.run

    def stopping_run(ctx, inputs, options):
        result = run(ctx, inputs, options)
        if where == "pass" and ctx.node == stop:
            wait_to_be_killed()
        return result

    p.run = stopping_run


for p in default_registry().passes.values():
    wrap(p)

real_rename, real_commit = os.rename, cache.Store.commit


def rename(src, dst, *a, **kw):
    meta = Path(src) / "meta.json"
    if where == "commit" and meta.is_file() and json.loads(meta.read_text()).get("node") == stop:
        wait_to_be_killed()
    return real_rename(src, dst, *a, **kw)


def commit(self, key, staging, kind, main, record):
    art = real_commit(self, key, staging, kind, main, record)
    with open(log, "a") as f:
        f.write(record["node"] + "\n")
    return art


os.rename, cache.Store.commit = rename, commit
from accelc.cli import main

sys.argv = ["accelc", *sys.argv[1:]]
main()
"""


def _node_keys(recipe: Path, cache: Path) -> list[tuple[str, str]]:
    _, nodes = plan(recipe, cache_dir=cache)
    return [(n.id, n.key) for n in nodes]


def _check_store(store: Store, keys: list[tuple[str, str]], done: int) -> None:
    """Nodes ``[:done]`` are committed and intact; the rest have no entry a build would trust."""
    for node, key in keys[:done]:
        assert store.open(key, verify=True, touch=False), node
    for node, key in keys[done:]:
        assert store.lookup(key) is None, f"{node} has an entry although it never completed"
    assert store.verify_all() == []


@pytest.fixture
def sigint_raises_keyboard_interrupt():
    """Python's default SIGINT handler for the test (a test runner's worker may ignore SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_in_every_pass(reliability_golden, tmp_path, sigint_raises_keyboard_interrupt):
    g = reliability_golden.int8
    cache, out = tmp_path / "cache", tmp_path / "out"
    store = Store(cache)
    keys = _node_keys(g.recipe, cache)
    registry = build_registry(make_plugin_manager(load_entry_points=False))
    runs: Counter[str] = Counter()
    stop = {"node": None}

    def wrap(p):
        run = p.run

        def interruptible(ctx, inputs, options):
            result = run(ctx, inputs, options)
            runs[ctx.node] += 1
            if ctx.node == stop["node"]:
                assert any(ctx.workdir.iterdir())  # the staging dir holds the pass's output
                signal.raise_signal(signal.SIGINT)
            return result

        p.run = interruptible

    for p in registry.passes.values():
        wrap(p)

    for i, (node, _) in enumerate(keys):
        stop["node"] = node
        with pytest.raises(KeyboardInterrupt):
            build(g.recipe, out_dir=out, cache_dir=cache, registry=registry)
        _check_store(store, keys, i)
        assert list(store.tmp.iterdir()) == []  # SIGINT unwinds: the staging dir is removed

    stop["node"] = None
    outcome = build(g.recipe, out_dir=out, cache_dir=cache, registry=registry)
    assert outcome.ok, outcome.result.failure
    assert (out / "model.onnx").read_bytes() == g.final_bytes
    # each pass ran twice: once interrupted, once to completion; completed entries were reused
    assert runs == {node: 2 for node, _ in keys}


def _spawn(tmp: Path, recipe: Path, cache: Path, out: Path, stop: str) -> tuple[subprocess.Popen, Path]:
    driver = tmp / "driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    ready = tmp / f"ready.{stop.replace(':', '_').replace('[', '_').replace(']', '_')}"
    env = {
        **os.environ,
        "ACCELC_TEST_STOP": stop,
        "ACCELC_TEST_READY": str(ready),
        "ACCELC_TEST_LOG": str(tmp / "committed.log"),
        "COLUMNS": "200",
    }
    p = subprocess.Popen(
        [sys.executable, str(driver), "build", str(recipe), "--cache-dir", str(cache), "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return p, ready


def _kill_when_ready(p: subprocess.Popen, ready: Path, sig: int) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    while not ready.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            _, err = p.communicate()
            pytest.fail(f"the build never reached its stop point (exit {p.returncode}):\n{err[-3000:]}")
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


def test_killed_builds_in_subprocesses(reliability_golden, tmp_path):
    g = reliability_golden.int8
    cache, out = tmp_path / "cache", tmp_path / "out"
    store = Store(cache)
    keys = _node_keys(g.recipe, cache)
    index = {node: i for i, (node, _) in enumerate(keys)}

    steps = [
        ("pass:load_model", signal.SIGKILL),
        ("commit:onnxsim", signal.SIGKILL),
        ("pass:quantize", signal.SIGINT),
        ("pass:benchmark", signal.SIGKILL),
    ]
    for stop, sig in steps:
        p, ready = _spawn(tmp_path, g.recipe, cache, out, stop)
        rc, err = _kill_when_ready(p, ready, sig)
        node = stop.split(":", 1)[1]
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:
            assert rc == 130 and "interrupted" in err, err[-2000:]
        _check_store(store, keys, index[node])
        if stop.startswith("commit:"):  # killed after meta.json was written: still only a staging dir
            staged = [d for d in store.tmp.iterdir() if (d / "meta.json").is_file()]
            assert staged and json.loads((staged[0] / "meta.json").read_text())["node"] == node
        assert not (out / "accelc.lock").exists()  # no out dir claims a build that did not finish

    outcome = build(g.recipe, out_dir=out, cache_dir=cache)
    assert outcome.ok, outcome.result.failure
    assert (out / "model.onnx").read_bytes() == g.final_bytes
    assert outcome.report["final_digest"] == g.digests["quantize"]
    rebuilt = [s["node"] for s in outcome.report["stages"] if not s["cached"]]
    assert rebuilt == ["benchmark"]  # everything completed before was reused
    committed = Counter((tmp_path / "committed.log").read_text().split()) + Counter(rebuilt)
    assert committed == {node: 1 for node, _ in keys}  # every entry was computed exactly once
    store.sweep()  # what SIGKILL left in tmp/ is debris that gc removes
    assert list(store.tmp.iterdir()) == []
