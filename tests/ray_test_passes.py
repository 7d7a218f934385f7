"""Passes for the Ray executor tests (imported by the test cluster's workers via PYTHONPATH).

``fake_engine`` stands in for a TensorRT engine build: it requires ``cuda`` (so its Ray task
asks for a GPU of the target's type) but runs on any CPU, and records which test node ran it
(``$ACCELC_TEST_NODE``). ``dies_once`` kills its own worker process the first time it runs
(after writing half its output), so Ray must retry it."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

from accelc.pass_api import Pass, PassResult, Slot
from accelc.plugins.hookspecs import hookimpl


class FakeEngine(Pass):
    """Writes an 'engine' (the sha256 of its input model) and the test node that built it."""

    name = "fake_engine"
    inputs = (Slot("model", ("onnx.qdq", "onnx")),)
    produces = "trt.engine"
    requires = ("cuda",)

    def run(self, ctx, inputs, options):
        digest = hashlib.sha256(inputs["model"].file.read_bytes()).hexdigest()
        (ctx.workdir / "model.engine").write_text(digest)
        return PassResult("model.engine", metrics={"built_by": os.environ.get("ACCELC_TEST_NODE", "?")})


class DiesOnce(Pass):
    """Copies its input model; the first run (no marker file yet) SIGKILLs its own worker mid-write."""

    name = "dies_once"
    inputs = (Slot("model", ("onnx.qdq",)),)
    produces = "onnx.qdq"

    def run(self, ctx, inputs, options):
        data = inputs["model"].file.read_bytes()
        marker = Path(os.environ["ACCELC_TEST_DIE_MARKER"])
        out = ctx.workdir / "model.onnx"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            out.write_bytes(data[: len(data) // 2])  # half written when the worker dies
            os.kill(os.getpid(), signal.SIGKILL)
        out.write_bytes(data)
        return PassResult("model.onnx", metrics={"attempt_pid": os.getpid()})


class RayTestPlugin:
    @hookimpl
    def accelc_register_passes(self):
        return [FakeEngine, DiesOnce]
