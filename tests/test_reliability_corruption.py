"""Corruption: an entry whose bytes were changed, truncated or removed after it was written is
detected on read, reported, rebuilt and never used; ``accelc cache verify`` checks the whole store.

How each test was checked to fail without its mechanism:

* payload tests: with ``Store.open``'s digest comparison disabled (``verify`` ignored), the
  corrupted bytes reach the next pass or the out dir, and the build fails or the artifact differs;
* meta.json tests: without the ``meta_sha256`` check in ``Store.lookup``, a changed metric is
  reported as the cached result (and the build fails verification);
* the missing-meta test failed with an ``AssertionError`` traceback before ``_ensure`` evicted
  the broken leftover (the rebuilt entry's rename hit ``ENOTEMPTY`` and was discarded);
* the copy test: without ``copy_artifact`` comparing the copy with the recorded digest, the
  bytes changed in transit are deployed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from accelc.build import build
from accelc.cache import Store
from accelc.cli import main


class Notices:
    """A reporter that keeps the notices (corruption reports) and which stages were rebuilt."""

    def __init__(self) -> None:
        self.notices: list[str] = []
        self.built: list[str] = []

    def stage_started(self, node_id: str, pass_name: str) -> None:
        pass

    def stage_progress(self, node_id: str, message: str) -> None:
        pass

    def stage_finished(self, node_id: str, cached: bool, seconds: float, metrics: dict) -> None:
        if not cached:
            self.built.append(node_id)

    def notice(self, message: str) -> None:
        self.notices.append(message)


def corrupt(entry: Path, how: str) -> None:
    """Damage an entry's primary file: flip bytes in the middle, truncate it, or remove it."""
    meta = json.loads((entry / "meta.json").read_text())
    f = entry / meta["main"]
    data = f.read_bytes()
    if how == "changed":
        mid = len(data) // 2
        f.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 8]) + data[mid + 8 :])
    elif how == "truncated":
        f.write_bytes(data[: len(data) // 3])
    else:
        f.unlink()


@pytest.mark.parametrize("how", ["changed", "truncated", "removed"])
def test_corrupt_final_artifact_is_reported_rebuilt_and_never_deployed(
    how, reliability_golden, reliability_warm_cache, tmp_path
):
    g = reliability_golden.int8
    key = g.keys["quantize"]
    corrupt(reliability_warm_cache / "entries" / key, how)
    rep = Notices()
    outcome = build(g.recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache, reporter=rep)
    assert outcome.ok, outcome.result.failure
    assert any(key[:12] in n and "rebuilding" in n for n in rep.notices), rep.notices
    assert (tmp_path / "out" / "model.onnx").read_bytes() == g.final_bytes
    assert outcome.report["final_digest"] == g.digests["quantize"]
    assert Store(reliability_warm_cache).verify_all() == []


@pytest.mark.parametrize("how", ["changed", "truncated", "removed"])
def test_corrupt_input_of_a_pass_that_runs_is_rebuilt_before_the_pass_reads_it(
    how, reliability_golden, reliability_warm_cache, tmp_path
):
    g = reliability_golden.int8
    store = Store(reliability_warm_cache)
    corrupt(store.entries / g.keys["onnxsim"], how)
    store.evict(g.keys["calibrate"])  # calibrate must run, and it reads onnxsim's model
    rep = Notices()
    outcome = build(g.recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache, reporter=rep)
    assert outcome.ok, outcome.result.failure
    assert any(g.keys["onnxsim"][:12] in n for n in rep.notices), rep.notices
    assert store.open(g.keys["onnxsim"]).digest == g.digests["onnxsim"]  # rebuilt to the same bytes
    assert (tmp_path / "out" / "model.onnx").read_bytes() == g.final_bytes
    assert store.verify_all() == []


def test_changed_metrics_in_meta_json_are_not_trusted(reliability_golden, reliability_warm_cache, tmp_path):
    g = reliability_golden.int8
    key = g.keys["verify[quantize]"]
    meta_file = reliability_warm_cache / "entries" / key / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["metrics"]["cosine"] = 0.5  # still valid JSON, still a plausible number
    meta_file.write_text(json.dumps(meta, indent=1, sort_keys=True))
    rep = Notices()
    outcome = build(g.recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache, reporter=rep)
    assert outcome.ok, outcome.result.failure
    stage = next(s for s in outcome.report["stages"] if s["node"] == "verify[quantize]")
    assert not stage["cached"] and stage["metrics"]["cosine"] > 0.9
    assert any(key[:12] in n and "meta.json" in n for n in rep.notices), rep.notices


def test_entry_without_meta_json_is_rebuilt_not_a_crash(reliability_golden, reliability_warm_cache, tmp_path):
    g = reliability_golden.int8
    (reliability_warm_cache / "entries" / g.keys["verify[onnxsim]"] / "meta.json").unlink()
    outcome = build(g.recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache)
    assert outcome.ok, outcome.result.failure
    built = [s["node"] for s in outcome.report["stages"] if not s["cached"]]
    assert built == ["verify[onnxsim]"]
    assert Store(reliability_warm_cache).verify_all() == []


def test_cache_verify_checks_every_entry_and_names_the_corrupt_ones(reliability_golden, reliability_warm_cache):
    g = reliability_golden.int8
    runner = CliRunner()
    ok = runner.invoke(main, ["cache", "verify", "--cache-dir", str(reliability_warm_cache)])
    n = len(list((reliability_warm_cache / "entries").iterdir()))
    assert ok.exit_code == 0 and f"{n} entries checked, 0 corrupt" in ok.output

    corrupt(reliability_warm_cache / "entries" / g.keys["export_onnx"], "changed")
    corrupt(reliability_warm_cache / "entries" / g.keys["load_data[validation]"], "truncated")
    meta = reliability_warm_cache / "entries" / g.keys["reference"] / "meta.json"
    meta.write_text(meta.read_text().replace('"reference"', '"referencf"', 1))
    bad = runner.invoke(main, ["cache", "verify", "--cache-dir", str(reliability_warm_cache)])
    assert bad.exit_code == 6, bad.output
    for node in ("export_onnx", "load_data[validation]", "reference"):
        assert g.keys[node][:12] in bad.output, (node, bad.output)
    assert "3 corrupt" in bad.output


def test_copy_to_out_dir_is_checked_against_the_recorded_digest(
    reliability_golden, reliability_warm_cache, tmp_path, monkeypatch
):
    """Bytes that change between the digest check and the copy (a flaky disk) never reach the out dir."""
    import accelc.executor as executor

    real_copy = executor.shutil.copyfile

    def flaky_copy(src, dst, *a, **kw):
        real_copy(src, dst, *a, **kw)
        if Path(src).name == "model.onnx":
            with open(dst, "r+b") as f:
                f.seek(100)
                f.write(b"\0\0\0\0")

    monkeypatch.setattr(executor.shutil, "copyfile", flaky_copy)
    g = reliability_golden.int8
    out = tmp_path / "out"
    outcome = build(g.recipe, out_dir=out, cache_dir=reliability_warm_cache)
    assert not outcome.ok and "does not match its recorded digest" in str(outcome.result.failure)
    assert not (out / "model.onnx").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
