"""The shared remote cache (accelc.remote): against a real S3 API (moto's server on 127.0.0.1,
started here) and against ``file://``. "Machine A" and "machine B" are two local cache dirs
sharing one remote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("fsspec", reason="the remote cache needs the [cluster] extra (fsspec)")

from accelc.build import build  # noqa: E402
from accelc.cache import Store  # noqa: E402
from accelc.cli import main  # noqa: E402
from accelc.errors import CorruptEntryError  # noqa: E402
from accelc.executor import SilentReporter  # noqa: E402
from accelc.remote import RemoteStore, display_url  # noqa: E402

KEY_ID = "AKIDACCELCTESTKEYID01"
SECRET = "accelc-test-secret-never-in-a-report"


@pytest.fixture(scope="module")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1 (a free port), with the standard AWS variables pointing at it."""
    pytest.importorskip("s3fs", reason="s3:// needs the [cluster] extra (s3fs)")
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the [test] extra)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


_bucket_n = iter(range(10_000))


@pytest.fixture(params=["file", "s3"])
def remote_url(request, tmp_path):
    """A fresh, empty remote: a ``file://`` dir or a new bucket on the moto server."""
    if request.param == "file":
        return (tmp_path / "remote").as_uri()
    request.getfixturevalue("s3_server")
    import s3fs

    bucket = f"accelc-cache-{next(_bucket_n)}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/team"


def _recipe(project, tmp: Path, name: str = "tiny") -> Path:
    return project.write_recipe(tmp / "recipes", name, benchmark={"enabled": False})


class Notices(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def notice(self, message: str) -> None:
        self.lines.append(message)


def _corrupt_blob(url: str, digest: str) -> None:
    rs = RemoteStore(url)
    path = rs.blob_path(digest)
    data = bytearray(rs.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    rs.fs.pipe_file(path, bytes(data))


def test_machine_b_reuses_machine_a_builds_and_reruns_nothing(reliability_project, remote_url, tmp_path):
    recipe = _recipe(reliability_project, tmp_path)
    a = build(recipe, out_dir=tmp_path / "out_a", cache_dir=tmp_path / "A", cache_url=remote_url)
    assert a.ok, a.result.failure
    assert not any(s.cached for s in a.result.stages)
    assert a.report["remote_cache"]["uploads"] == len(a.result.stages)

    b = build(recipe, out_dir=tmp_path / "out_b", cache_dir=tmp_path / "B", cache_url=remote_url)
    assert b.ok, b.result.failure
    assert all(s.cached for s in b.result.stages), [s.node for s in b.result.stages if not s.cached]
    assert b.report["remote_cache"]["remote_hits"] == len(b.result.stages)
    final = a.report["final_artifact"]
    assert (tmp_path / "out_b" / final).read_bytes() == (tmp_path / "out_a" / final).read_bytes()
    assert [s.digest for s in b.result.stages] == [s.digest for s in a.result.stages]
    assert Store(tmp_path / "B").verify_all() == []  # what B downloaded is whole and checked
    assert RemoteStore(remote_url).verify() == (len(a.result.stages), [])


def test_corrupted_remote_object_is_refused_rebuilt_and_repaired(reliability_project, remote_url, tmp_path):
    recipe = _recipe(reliability_project, tmp_path)
    a = build(recipe, out_dir=tmp_path / "out_a", cache_dir=tmp_path / "A", cache_url=remote_url)
    assert a.ok, a.result.failure
    victim = next(s for s in a.result.stages if s.pass_name == "quantize")
    meta = RemoteStore(remote_url).read_record(victim.key)
    _corrupt_blob(remote_url, meta["files"][meta["main"]])
    checked, problems = RemoteStore(remote_url).verify()
    assert [p.key for p in problems] == [victim.key]

    notices = Notices()
    b = build(recipe, out_dir=tmp_path / "out_b", cache_dir=tmp_path / "B", cache_url=remote_url, reporter=notices)
    assert b.ok, b.result.failure
    rebuilt = [s.node for s in b.result.stages if not s.cached]
    assert rebuilt == [victim.node]
    assert any("refused" in n and victim.key[:12] in n for n in notices.lines), notices.lines
    assert b.report["remote_cache"]["refused"] == 1
    final = a.report["final_artifact"]
    assert (tmp_path / "out_b" / final).read_bytes() == (tmp_path / "out_a" / final).read_bytes()
    assert RemoteStore(remote_url).verify() == (checked, [])  # the rebuilt entry was uploaded over the bad one

    c = build(recipe, out_dir=tmp_path / "out_c", cache_dir=tmp_path / "C", cache_url=remote_url)
    assert all(s.cached for s in c.result.stages)


def test_refused_remote_entry_never_replaces_a_good_local_one(reliability_project, tmp_path):
    url = (tmp_path / "remote").as_uri()
    recipe = _recipe(reliability_project, tmp_path)
    a = build(recipe, out_dir=tmp_path / "out_a", cache_dir=tmp_path / "A", cache_url=url)
    key = a.result.stages[-1].key
    meta = RemoteStore(url).read_record(key)
    _corrupt_blob(url, meta["files"][meta["main"]])
    local = Store(tmp_path / "A")
    with pytest.raises(CorruptEntryError, match="does not match its recorded digest"):
        RemoteStore(url).fetch(key, Store(tmp_path / "fresh"))
    assert Store(tmp_path / "fresh").lookup(key) is None and not list((tmp_path / "fresh" / "tmp").iterdir())
    with pytest.raises(CorruptEntryError):
        RemoteStore(url).fetch(key, local)
    local.open(key, verify=True)  # still intact


def test_interrupted_upload_leaves_nothing_a_reader_trusts(reliability_project, remote_url, tmp_path, monkeypatch):
    recipe = _recipe(reliability_project, tmp_path)
    calls = []
    real = RemoteStore._put_record

    def interrupted(self, key, raw):  # the process dies after the blobs, before the record
        calls.append(key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, key, raw)

    monkeypatch.setattr(RemoteStore, "_put_record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, out_dir=tmp_path / "out_a", cache_dir=tmp_path / "A", cache_url=remote_url)
    monkeypatch.setattr(RemoteStore, "_put_record", real)
    rs = RemoteStore(remote_url)
    assert rs.keys() == [calls[0]]  # the interrupted entry has no record, so no reader sees it
    assert rs.verify() == (1, [])

    b = build(recipe, out_dir=tmp_path / "out_b", cache_dir=tmp_path / "B", cache_url=remote_url)
    assert b.ok, b.result.failure
    cached = {s.key: s.cached for s in b.result.stages}
    assert cached[calls[0]] and not cached[calls[1]]
    assert RemoteStore(remote_url).verify() == (len(b.result.stages), [])


def test_two_writers_of_one_key_converge_on_one_complete_entry(reliability_project, tmp_path):
    url = (tmp_path / "remote").as_uri()
    recipe = _recipe(reliability_project, tmp_path)
    a = build(recipe, out_dir=tmp_path / "out_a", cache_dir=tmp_path / "A", no_cache=False)
    key = a.result.stages[-1].key
    # Machine B's entry for the same key holds different bytes (a non-deterministic pass): rewrite it.
    b_store = Store(tmp_path / "B")
    staging = b_store.staging(key)
    a_meta = Store(tmp_path / "A").lookup(key).meta
    for name in a_meta["files"]:
        (staging / name).write_bytes((tmp_path / "A" / "entries" / key / name).read_bytes() + b"\n")
    b_store.commit(key, staging, a_meta["kind"], a_meta["main"], {"node": a_meta["node"]})

    rs = RemoteStore(url)
    assert rs.push(key, Store(tmp_path / "A"))
    assert not rs.push(key, b_store)  # an intact entry is there: left alone
    assert rs.push(key, b_store, force=True)  # even a forced overwrite leaves one whole entry
    assert rs.verify() == (1, [])
    got = rs.fetch(key, Store(tmp_path / "C"))
    assert got is not None and got.meta["files"] == b_store.lookup(key).meta["files"]


def test_credentials_and_endpoint_never_reach_the_lock_file_or_reports(reliability_project, s3_server, tmp_path):
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("accelc-secrets")
    recipe = _recipe(reliability_project, tmp_path)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        ["build", str(recipe), "--cache-dir", str(tmp_path / "A"), "--out", str(out)],
        env={"ACCELC_CACHE_URL": "s3://accelc-secrets/x"},
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["remote_cache"]["url"] == "s3://accelc-secrets/x"
    port = s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
    files = [f for f in out.rglob("*") if f.is_file()]  # the published generation under .accelc/ too
    assert files
    for f in files:
        text = f.read_text(errors="replace")
        for secret in (KEY_ID, SECRET, s3_server["AWS_ENDPOINT_URL"], f"127.0.0.1:{port}"):
            assert secret not in text, (f.name, secret)
    assert display_url("s3://AKID:SECRET@bucket/p?x=1") == "s3://bucket/p"


def test_cache_push_pull_verify_remote(reliability_warm_cache, tmp_path):
    url = (tmp_path / "remote").as_uri()
    cli = CliRunner()
    local = Store(reliability_warm_cache)
    n = len(local.list())
    r = cli.invoke(main, ["cache", "push", "--remote", "--cache-dir", str(reliability_warm_cache), "--cache-url", url])
    assert r.exit_code == 0 and f"uploaded {n} entries" in r.output, r.output
    r = cli.invoke(main, ["cache", "verify", "--remote", "--cache-url", url])
    assert r.exit_code == 0 and f"{n} remote entries checked" in r.output and "0 corrupt" in r.output, r.output

    victim = local.list()[0].key
    meta = RemoteStore(url).read_record(victim)
    _corrupt_blob(url, meta["files"][meta["main"]])
    r = cli.invoke(main, ["cache", "verify", "--remote", "--cache-url", url])
    assert r.exit_code == 6 and victim[:12] in r.output, r.output

    fresh = tmp_path / "fresh"
    r = cli.invoke(main, ["cache", "pull", "--remote", "--cache-dir", str(fresh), "--cache-url", url])
    assert r.exit_code == 6 and f"downloaded {n - 1} entries, 1 refused" in r.output, r.output
    assert Store(fresh).lookup(victim) is None and Store(fresh).verify_all() == []


def test_build_without_the_cluster_packages_works_as_before(reliability_project, tmp_path):
    """fsspec, s3fs and ray are imported only when asked for: a build with them hidden succeeds."""
    recipe = _recipe(reliability_project, tmp_path)
    code = f"""
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fsspec", "s3fs", "ray", "moto", "botocore", "aiobotocore"):
            raise ImportError("hidden: " + name)
sys.meta_path.insert(0, Hide())
from accelc.build import build
o = build({str(recipe)!r}, out_dir={str(tmp_path / 'out')!r}, cache_dir={str(tmp_path / 'cache')!r})
assert o.ok, o.result.failure
assert "remote_cache" not in o.report
assert not any(m.split(".")[0] in ("fsspec", "ray") for m in sys.modules)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
