"""Builds on a Ray cluster (accelc.ray_executor).

The cluster is started here: a head node (no CPUs for tasks) and two workers on this machine,
each with its own local cache dir, sharing one ``file://`` remote cache. The "T4 worker"
declares a fake GPU and the ``accelerator_type:T4`` resource; ``fake_engine`` (tests/ray_test_passes.py)
stands in for a TensorRT build, so it runs on a CPU. Startup takes ~20 s: the cluster tests are
marked ``slow`` and share one module-scoped cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from accelc.build import build
from accelc.cache import Store
from accelc.cli import main
from accelc.host import Host
from accelc.plugins.manager import make_plugin_manager
from accelc.registry import build_registry

TESTS = Path(__file__).resolve().parent
T4_HOST = {"cuda": {"name": "Tesla T4", "sm": 75, "count": 1}}


@pytest.fixture(scope="module")
def registry():
    from ray_test_passes import RayTestPlugin

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(RayTestPlugin(), name="raytest")
    return build_registry(pm)


def _t4_recipe(project, directory: Path, name: str = "tiny_t4", target: str = "t4") -> Path:
    return project.write_recipe(
        directory,
        name,
        target=target,
        passes=["fuse_modules", "export_onnx", "onnxsim", "calibrate", "quantize", "fake_engine"],
        verify={"enabled": False},
        benchmark={"enabled": False},
    )


def _cpu_recipe(project, directory: Path, name: str = "tiny_cpu", **over) -> Path:
    return project.write_recipe(directory, name, benchmark={"enabled": False}, **over)


def test_ray_accelerator_types_are_rays_own():
    accelerators = pytest.importorskip("ray.util.accelerators", reason="needs the [cluster] extra (ray)")
    from accelc.ray_executor import ACCELERATOR_TYPES

    assert ACCELERATOR_TYPES["t4"] == accelerators.NVIDIA_TESLA_T4
    assert ACCELERATOR_TYPES["a100"] == accelerators.NVIDIA_A100
    assert ACCELERATOR_TYPES["h100"] == accelerators.NVIDIA_H100


def test_plan_executor_ray_says_what_each_node_needs(reliability_project, tmp_path):
    from accelc.build import prepare
    from accelc.ray_executor import plan_resources

    recipe = reliability_project.write_recipe(tmp_path, "tiny_t4", target="t4", precision="int8")
    graph, reg = prepare(recipe)
    res = plan_resources(graph, reg)
    assert res["trt_engine"].ray_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "T4"}
    assert res["trt_engine"].pinned  # its key names the GPU and TensorRT version of the machine
    assert res["quantize"].ray_options() == {"num_cpus": 1.0, "num_gpus": 0.0} and not res["quantize"].pinned
    r = CliRunner().invoke(
        main, ["plan", str(recipe), "--executor", "ray", "--cache-dir", str(tmp_path / "c")], terminal_width=400
    )
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "1 GPU (T4)" in text and "pinned" in text and "trt_engine" in text
    assert "blocked" not in r.output  # the cluster, not this host, decides where a node can run


# -- on a local cluster -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray", reason="needs the [cluster] extra (ray)")
    pytest.importorskip("fsspec", reason="needs the [cluster] extra (fsspec)")
    import ray
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("ray_cluster")
    remote = (root / "remote").as_uri()
    common = {
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "ACCELC_TEST_DIE_MARKER": str(root / "died_once"),
    }
    small = {"object_store_memory": 80 * 2**20}
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "env_vars": common, **small},
    )
    workers = {}
    for label, extra in (("cpu-worker", {}), ("t4-worker", {"num_gpus": 1, "resources": {"accelerator_type:T4": 1}})):
        env = {**common, "ACCELC_TEST_NODE": label, "ACCELC_CACHE_DIR": str(root / f"cache-{label}")}
        workers[label] = c.add_node(num_cpus=1, env_vars=env, **extra, **small)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield {"cluster": c, "root": root, "remote": remote, "workers": workers}
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.mark.slow
def test_cluster_build_matches_local_and_gpu_pass_runs_on_the_t4_worker(
    cluster, reliability_project, registry, tmp_path
):
    from accelc.ray_executor import build_on_ray
    from accelc.remote import RemoteStore

    t4, cpu = _t4_recipe(reliability_project, tmp_path), _cpu_recipe(reliability_project, tmp_path)
    outcomes = build_on_ray(
        [t4, cpu], out_dir=tmp_path / "out", cache_dir=tmp_path / "driver", cache_url=cluster["remote"],
        registry=registry,
    )
    assert all(o.ok for o in outcomes), [o.result.failure for o in outcomes]
    t4_out, cpu_out = outcomes
    engine = next(s for s in t4_out.report["stages"] if s["pass"] == "fake_engine")
    assert engine["metrics"]["built_by"] == "t4-worker" and engine["ran_on"]
    assert all(s.get("ran_on") for o in outcomes for s in o.report["stages"])
    assert (tmp_path / "out" / "tiny_t4" / "model.engine").is_file() and (tmp_path / "out" / "tiny_cpu").is_dir()

    # Common upstream nodes are one node: same key, same task, same result in both reports.
    by_key = {s["artifact"]["key"]: s for s in t4_out.report["stages"]}
    shared = [s for s in cpu_out.report["stages"] if s["artifact"]["key"] in by_key]
    assert {s["node"] for s in shared} >= {"load_model", "fuse_modules", "export_onnx", "onnxsim"}
    for s in shared:
        assert by_key[s["artifact"]["key"]]["ran_on"] == s["ran_on"]
    unique = {s["artifact"]["key"] for o in outcomes for s in o.report["stages"]}
    assert RemoteStore(cluster["remote"]).verify() == (len(unique), [])  # every entry went through the remote

    # The same recipes built locally (a T4 described to the host) give the same final digests.
    for recipe, o in ((t4, t4_out), (cpu, cpu_out)):
        local = build(
            recipe, out_dir=tmp_path / "local" / recipe.stem, cache_dir=tmp_path / "local_cache",
            host=Host(overrides=T4_HOST), registry=registry,
        )
        assert local.ok, local.result.failure
        keys = {s.node: s.key for s in local.result.stages}
        assert keys == {s["node"]: s["artifact"]["key"] for s in o.report["stages"]}
        final = o.report["final_artifact"]
        assert (local.out_dir / final).read_bytes() == (o.out_dir / final).read_bytes()


@pytest.mark.slow
def test_gpu_type_no_node_offers_is_blocked(cluster, reliability_project, registry, tmp_path):
    from accelc.ray_executor import build_on_ray

    recipe = _t4_recipe(reliability_project, tmp_path, "tiny_a100", target="a100")
    (o,) = build_on_ray([recipe], out_dir=tmp_path / "out", cache_url=cluster["remote"], registry=registry,
                        cache_dir=tmp_path / "driver")
    assert not o.ok and o.result.failure.exit_code == 3
    last = o.report["stages"][-1]
    assert last["node"] == "fake_engine" and last["status"] == "blocked"
    assert "no node of the Ray cluster offers 1 GPU (A100)" in last["error"]
    assert all(s["status"] == "ok" for s in o.report["stages"][:-1])  # the CPU part still ran


@pytest.mark.slow
def test_worker_killed_mid_task_is_retried_and_leaves_a_clean_cache(cluster, reliability_project, registry, tmp_path):
    from accelc.ray_executor import build_on_ray
    from accelc.remote import RemoteStore

    marker = cluster["root"] / "died_once"
    marker.unlink(missing_ok=True)
    recipe = _cpu_recipe(
        reliability_project, tmp_path, "tiny_dies",
        passes=["fuse_modules", "export_onnx", "onnxsim", "calibrate", "quantize", "dies_once"],
        verify={"enabled": False},
    )
    (o,) = build_on_ray([recipe], out_dir=tmp_path / "out", cache_url=cluster["remote"], registry=registry,
                        cache_dir=tmp_path / "driver")
    assert marker.exists(), "the first attempt did not run"
    assert o.ok, o.result.failure
    stage = next(s for s in o.result.stages if s.pass_name == "dies_once")
    assert not stage.cached and stage.metrics["attempt_pid"] != int(marker.read_text())  # a second worker did it
    quantized = next(s for s in o.result.stages if s.pass_name == "quantize")
    assert stage.digest == quantized.digest  # the whole model, not the half the killed attempt wrote
    for label in ("cpu-worker", "t4-worker"):
        store = Store(cluster["root"] / f"cache-{label}")
        assert store.verify_all() == []
        assert not [d for d in store.entries.iterdir() if store.lookup(d.name) is None]  # no partial entry
    assert RemoteStore(cluster["remote"]).verify()[1] == []


@pytest.mark.slow
def test_cli_build_executor_ray_several_recipes(cluster, reliability_project, tmp_path, monkeypatch):
    """``accelc build --executor ray A B`` (the cluster's remote as ACCELC_CACHE_URL): one out dir per
    recipe, a "ran on" column, and each stage's node in report.json."""
    import json

    from ray_test_passes import RayTestPlugin

    import accelc.build

    def with_test_passes():
        pm = make_plugin_manager(load_entry_points=False)
        pm.register(RayTestPlugin(), name="raytest")
        return build_registry(pm)

    monkeypatch.setattr(accelc.build, "default_registry", with_test_passes)
    # benchmark's key names the CPU it ran on: it is keyed with a probed node's facts and pinned there
    a = reliability_project.write_recipe(tmp_path, "cli_a")
    b = _t4_recipe(reliability_project, tmp_path, "cli_b")
    r = CliRunner().invoke(
        main,
        ["build", "--executor", "ray", str(a), str(b), "--out", str(tmp_path / "out"),
         "--cache-dir", str(tmp_path / "driver")],
        env={"ACCELC_CACHE_URL": cluster["remote"]},
    )
    assert r.exit_code == 0, r.output
    assert "ran on" in r.output
    for name, final in (("cli_a", "model.onnx"), ("cli_b", "model.engine")):
        rep = json.loads((tmp_path / "out" / name / "report.json").read_text())
        assert (tmp_path / "out" / name / final).is_file()
        assert all(s["ran_on"] for s in rep["stages"]) and rep["remote_cache"]["url"] == cluster["remote"]
        if name == "cli_a":
            bench = next(s for s in rep["stages"] if s["pass"] == "benchmark")
            assert bench["status"] == "ok" and "1" in bench["metrics"]["batch"]
    r = CliRunner().invoke(main, ["build", "--executor", "ray", "--no-cache", str(a)])
    assert r.exit_code == 2 and "--no-cache" in r.output
