"""Out dir ownership and atomic publishing: accelc removes or replaces only what its own
publishing wrote, refuses a user's files, roots and the home directory, and a reader never sees
a mix of two builds, even when a build is killed while publishing.

How each test was checked to fail without its mechanism (on the main branch before this change):

* a lock file naming ``../victim``, an absolute path or a path through a symlink: the old
  ``_publish`` unlinked every name in the previous ``accelc.lock``'s ``final.files``;
* a user's ``model.onnx`` / ``report.json``: silently overwritten (there was no ``--force``);
* ``--out`` the home directory: accepted (there was no ``check_out_dir``);
* kill -9 after the artifact copy: the new ``model.onnx`` sat beside the previous reports;
* leftovers: ``.model.onnx.<pid>.<rand>.tmp`` of a killed copy was never removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from accelc.build import OutDirError, build, check_out_dir
from accelc.cli import main


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_lock_file_naming_paths_outside_the_out_dir_deletes_nothing(reliability_golden, reliability_warm_cache,
                                                                       tmp_path):
    g = reliability_golden.int8
    out = tmp_path / "out"
    assert build(g.recipe, out_dir=out, cache_dir=reliability_warm_cache).ok
    victims = tmp_path / "victims"
    (victims / "dir").mkdir(parents=True)
    rel, absolute, through_link = victims / "victim_rel.txt", victims / "victim_abs.txt", victims / "dir" / "v.txt"
    for v in (rel, absolute, through_link):
        v.write_text("the user's")
    (out / "link").symlink_to(victims / "dir")
    names = [os.path.relpath(rel, out), str(absolute), "link/v.txt", "link"]
    (out / "accelc.lock").write_text(json.dumps({"final": {"files": names, "digest": "x"}}))
    outcome = build(reliability_golden.fp32.recipe, out_dir=out, cache_dir=reliability_warm_cache)
    assert outcome.ok, outcome.result.failure
    assert all(v.read_text() == "the user's" for v in (rel, absolute, through_link))
    assert (out / "link").is_symlink()  # not accelc's: left alone
    assert _sha(out / "model.onnx") == reliability_golden.fp32.final_sha256


def test_user_files_in_the_out_dir_are_refused_unless_force(reliability_golden, reliability_warm_cache, tmp_path):
    g = reliability_golden.int8
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the user's model")
    (out / "report.json").write_text('{"mine": true}')
    args = ["build", str(g.recipe), "--out", str(out), "--cache-dir", str(reliability_warm_cache)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert "model.onnx" in r.output and "report.json" in r.output and "--force" in r.output
    assert (out / "model.onnx").read_bytes() == b"the user's model"
    assert (out / "report.json").read_text() == '{"mine": true}'
    r = CliRunner().invoke(main, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert _sha(out / "model.onnx") == g.final_sha256


def test_a_user_file_replacing_an_accelc_link_is_theirs(reliability_golden, reliability_warm_cache, tmp_path):
    g = reliability_golden.int8
    out = tmp_path / "out"
    assert build(g.recipe, out_dir=out, cache_dir=reliability_warm_cache).ok
    (out / "report.md").unlink()
    (out / "report.md").write_text("my notes")
    with pytest.raises(OutDirError, match="report.md") as e:
        build(g.recipe, out_dir=out, cache_dir=reliability_warm_cache)
    assert e.value.exit_code == 2 and (out / "report.md").read_text() == "my notes"


def test_an_out_dir_of_an_earlier_accelc_is_taken_over_only_when_its_digests_match(
    reliability_golden, reliability_warm_cache, tmp_path
):
    g = reliability_golden.int8
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("model.onnx", "report.json", "report.md", "accelc.lock"):  # plain files, as accelc 0.1 wrote them
        shutil.copyfile(g.out_dir / name, legacy / name)
    tampered = tmp_path / "tampered"
    shutil.copytree(legacy, tampered)
    (tampered / "model.onnx").write_bytes(b"edited by the user")
    assert build(reliability_golden.fp32.recipe, out_dir=legacy, cache_dir=reliability_warm_cache).ok
    assert (legacy / "model.onnx").is_symlink() and _sha(legacy / "model.onnx") == reliability_golden.fp32.final_sha256
    with pytest.raises(OutDirError, match="model.onnx"):
        build(reliability_golden.fp32.recipe, out_dir=tampered, cache_dir=reliability_warm_cache)
    assert (tampered / "model.onnx").read_bytes() == b"edited by the user"


def test_out_dir_that_is_a_root_or_the_home_directory_is_refused(reliability_golden, tmp_path, monkeypatch):
    with pytest.raises(OutDirError, match="filesystem root"):
        check_out_dir(Path("/"))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    r = CliRunner().invoke(
        main, ["build", str(reliability_golden.int8.recipe), "--out", str(home), "--cache-dir", str(tmp_path / "c")]
    )
    assert r.exit_code == 2 and "home directory" in r.output, r.output
    assert list(home.iterdir()) == []


_KILL_BEFORE_REPORTS = """
import os, signal, sys
import accelc.build as b
def killed(*a, **kw):
    os.kill(os.getpid(), signal.SIGKILL)
b.write_outputs = killed
b.build(sys.argv[1], out_dir=sys.argv[2], cache_dir=sys.argv[3])
"""


def test_a_build_killed_while_publishing_leaves_the_previous_build_whole(
    reliability_golden, reliability_warm_cache, tmp_path
):
    int8, fp32 = reliability_golden.int8, reliability_golden.fp32
    out = tmp_path / "out"
    assert build(int8.recipe, out_dir=out, cache_dir=reliability_warm_cache).ok
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILL_BEFORE_REPORTS), str(fp32.recipe), str(out),
         str(reliability_warm_cache)],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == -9, p.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    lock = json.loads((out / "accelc.lock").read_text())
    assert report["recipe"]["name"] == lock["recipe"]["name"] == int8.report["recipe"]["name"]
    assert _sha(out / "model.onnx") == int8.final_sha256  # the artifact the reports describe
    assert report["final_digest"] == int8.report["final_digest"]
    outcome = build(fp32.recipe, out_dir=out, cache_dir=reliability_warm_cache)  # the next build sweeps and publishes
    assert outcome.ok and _sha(out / "model.onnx") == fp32.final_sha256
    assert len(list((out / ".accelc" / "generations").iterdir())) == 1  # the killed one's generation is gone


def test_leftovers_of_interrupted_publishes_are_swept(reliability_golden, reliability_warm_cache, tmp_path):
    g = reliability_golden.int8
    out = tmp_path / "out"
    out.mkdir()
    tmp_copy = out / f".model.onnx.{os.getpid()}.deadbeef.tmp"  # what a kill during an older version's copy left
    tmp_copy.write_bytes(b"\0" * 4096)
    stale = out / ".accelc" / "generations" / "g1-1-deadbeef"  # an unfinished generation
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")
    mine = out / ".notes.tmp"  # not an accelc name
    mine.write_text("keep")
    assert build(g.recipe, out_dir=out, cache_dir=reliability_warm_cache).ok
    assert not tmp_copy.exists() and not stale.exists()
    assert mine.read_text() == "keep"
    current = out / ".accelc" / "current"
    assert current.is_symlink() and (current / "model.onnx").is_file()
    assert os.readlink(out / "model.onnx") == ".accelc/current/model.onnx"
    lock = json.loads((out / "accelc.lock").read_text())
    assert lock["final"]["sha256"] == {"model.onnx": g.final_sha256}  # what this publish wrote, with digests
