"""Host capabilities: what this machine can run, probed lazily.

Capability strings, as passes and targets declare them:

* ``cpu``, ``x86_64``, ``avx512_vnni``, ``avx2``: CPU facts from ``/proc/cpuinfo``;
* ``onnxruntime``: the ``onnxruntime`` package is importable;
* ``openvino``: the ``openvino`` package is importable;
* ``cuda``: torch sees a CUDA device;
* ``tensorrt``: the ``tensorrt`` Python package is importable;
* ``sm>=75`` (any comparison ``>= > == <= <``): the CUDA device's compute capability, as major*10+minor.

Probing ``cuda`` imports torch (about a second), so it is done only when a plan
contains a pass or target that asks for it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
from functools import cached_property
from typing import Any

_CAP = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)\s*(?:(?P<op>>=|<=|==|>|<)\s*(?P<value>\d+))?$")


def parse_capability(text: str) -> tuple[str, str | None, int | None]:
    """Split ``"sm>=75"`` into ``("sm", ">=", 75)``. Raises ``ValueError`` on bad syntax."""
    m = _CAP.match(text.strip())
    if not m:
        raise ValueError(f"bad capability '{text}': expected NAME or NAME>=NUMBER")
    v = m.group("value")
    return m.group("name"), m.group("op"), int(v) if v is not None else None


class Host:
    """Facts about this machine. ``check(cap)`` returns ``(ok, detail)``."""

    def __init__(self, overrides: dict[str, Any] | None = None):
        # overrides let tests describe another host (e.g. one with a T4) without hardware.
        self._overrides = overrides or {}

    @cached_property
    def cpu_flags(self) -> set[str]:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        return set(line.split(":", 1)[1].split())
        except OSError:
            pass
        return set()

    @cached_property
    def cpu_model(self) -> str:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()

    @property
    def cpu_count(self) -> int:
        """CPUs this process may use (affinity-aware)."""
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            return os.cpu_count() or 1

    @cached_property
    def cuda(self) -> dict[str, Any] | None:
        """``{"name", "sm", "count"}`` of CUDA device 0, or ``None``."""
        if "cuda" in self._overrides:
            return self._overrides["cuda"]
        if importlib.util.find_spec("torch") is None:
            return None
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return {
            "name": torch.cuda.get_device_name(0),
            "sm": major * 10 + minor,
            "count": torch.cuda.device_count(),
        }

    @cached_property
    def tensorrt_version(self) -> str | None:
        if "tensorrt" in self._overrides:
            return self._overrides["tensorrt"]
        if importlib.util.find_spec("tensorrt") is None:
            return None
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu12"):
            try:
                return version(dist)
            except PackageNotFoundError:
                continue
        return "unknown"

    def check(self, capability: str) -> tuple[bool, str]:
        """Whether this host has ``capability``; the detail says what was found."""
        name, op, value = parse_capability(capability)
        if name in self._overrides and name not in ("cuda", "tensorrt"):
            ok = bool(self._overrides[name])
            return ok, "override"
        if name == "cpu":
            return True, platform.machine()
        if name == "x86_64":
            return platform.machine() in ("x86_64", "AMD64"), platform.machine()
        if name in ("avx512_vnni", "avx2", "avx512f", "avx_vnni"):
            return name in self.cpu_flags, self.cpu_model
        if name in ("onnxruntime", "openvino"):
            ok = importlib.util.find_spec(name) is not None
            return ok, "installed" if ok else f"package {name} not installed"
        if name == "cuda":
            c = self.cuda
            return (c is not None), (c["name"] if c else "no CUDA device visible to torch")
        if name == "tensorrt":
            v = self.tensorrt_version
            return (v is not None), (f"TensorRT {v}" if v else "Python package tensorrt not installed")
        if name == "sm":
            c = self.cuda
            if c is None:
                return False, "no CUDA device"
            ok = _compare(c["sm"], op, value)
            return ok, f"{c['name']} is sm_{c['sm']}"
        return False, f"unknown capability '{name}'"

    def missing(self, capabilities: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
        """The capabilities not met, each with the detail of what was found."""
        out = []
        for cap in capabilities:
            ok, detail = self.check(cap)
            if not ok:
                out.append((cap, detail))
        return out

    def describe(self) -> dict[str, Any]:
        """Facts recorded in the lock file and report (cheap ones only; CUDA if already probed)."""
        d: dict[str, Any] = {
            "machine": platform.machine(),
            "system": platform.system(),
            "release": platform.release(),
            "cpu": self.cpu_model,
            "cpu_count": self.cpu_count,
            "avx512_vnni": "avx512_vnni" in self.cpu_flags,
        }
        if "cuda" in self.__dict__ or "cuda" in self._overrides:
            d["cuda"] = self.cuda
        return d


def _compare(actual: int, op: str | None, value: int | None) -> bool:
    if op is None or value is None:
        return True
    return {
        ">=": actual >= value,
        ">": actual > value,
        "==": actual == value,
        "<=": actual <= value,
        "<": actual < value,
    }[op]
