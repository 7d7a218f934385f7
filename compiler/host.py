"""Host capabilities: what this machine can run, probed lazily.

Capability strings, as passes, artifact kinds and targets declare them: ``NAME`` or
``NAME OP NUMBER`` (``sm>=75``; ``>= > == <= <``). Each NAME is answered by a probe a
plugin registers through ``accelc_register_host_capabilities``; the built-in plugins
register ``cpu``, ``x86_64``, ``avx2``/``avx512f``/``avx512_vnni``/``avx_vnni`` (from
``/proc/cpuinfo``), ``onnxruntime``, ``openvino``, ``tensorrt`` (the package is installed),
``cuda`` (torch sees a CUDA device) and ``sm`` (its compute capability, major*10+minor).

Probing ``cuda`` imports torch (about a second), so it is done only when a plan
contains a pass or target that asks for it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
from collections.abc import Callable
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


#: ``probe(host, op, value) -> (ok, detail)`` for a capability ``NAME [op value]`` (``op`` and
#: ``value`` are ``None`` for a bare name); ``detail`` says what was found.
Probe = Callable[["Host", "str | None", "int | None"], tuple[bool, str]]


class Host:
    """Facts about this machine. ``check(cap)`` returns ``(ok, detail)``.

    Args:
        overrides: describe another host without its hardware (tests): a bool answers that
            capability outright; any other value replaces the fact of that name that probes
            read through :meth:`fact` (``{"cuda": {"name": "Tesla T4", "sm": 75, "count": 1},
            "tensorrt": "10.13.3.9"}``, ``{"cuda": None}`` for no GPU).
        probes: ``{name: probe}``; default: the registry's (every plugin's) probes.
    """

    def __init__(self, overrides: dict[str, Any] | None = None, probes: dict[str, Probe] | None = None):
        self._overrides = overrides or {}
        self._probes = probes
        self._facts: dict[str, Any] = {}

    @property
    def probes(self) -> dict[str, Probe]:
        if self._probes is None:
            from .registry import default_registry

            self._probes = default_registry().capabilities
        return self._probes

    def fact(self, name: str, compute: Callable[[], Any]) -> Any:
        """A cached fact about this host (``compute()`` once), or its override."""
        if name in self._overrides:
            return self._overrides[name]
        if name not in self._facts:
            self._facts[name] = compute()
        return self._facts[name]

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

    def check(self, capability: str) -> tuple[bool, str]:
        """Whether this host has ``capability``; the detail says what was found (or that no plugin
        probes that name). Raises ``ValueError`` on bad syntax."""
        name, op, value = parse_capability(capability)
        if isinstance(self._overrides.get(name), bool):
            return self._overrides[name], "override"
        probe = self.probes.get(name)
        if probe is None:
            return False, f"unknown capability '{name}'"
        return probe(self, op, value)

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


def compare(actual: int, op: str | None, value: int | None) -> bool:
    if op is None or value is None:
        return True
    return {
        ">=": actual >= value,
        ">": actual > value,
        "==": actual == value,
        "<=": actual <= value,
        "<": actual < value,
    }[op]


def package_probe(package: str) -> Probe:
    """A probe for "the Python package ``package`` is importable" (found without importing it)."""

    def probe(host: Host, op: str | None, value: int | None) -> tuple[bool, str]:
        ok = importlib.util.find_spec(package) is not None
        return ok, "installed" if ok else f"package {package} not installed"

    return probe


def cpu_probes() -> dict[str, Probe]:
    """The CPU capabilities: ``cpu`` (always), ``x86_64``, and the ISA flags accelc's targets name."""

    def machine(host: Host, op: str | None, value: int | None) -> tuple[bool, str]:
        return True, platform.machine()

    def x86(host: Host, op: str | None, value: int | None) -> tuple[bool, str]:
        return platform.machine() in ("x86_64", "AMD64"), platform.machine()

    def flag(name: str) -> Probe:
        def probe(host: Host, op: str | None, value: int | None) -> tuple[bool, str]:
            return name in host.cpu_flags, host.cpu_model

        return probe

    out: dict[str, Probe] = {"cpu": machine, "x86_64": x86}
    out.update({f: flag(f) for f in ("avx512_vnni", "avx2", "avx512f", "avx_vnni")})
    return out


def cuda_probes() -> dict[str, Probe]:
    """``cuda`` (torch sees a CUDA device) and ``sm`` (its compute capability, major*10+minor)."""

    def cuda(host: Host, op: str | None, value: int | None) -> tuple[bool, str]:
        c = host.cuda
        return (c is not None), (c["name"] if c else "no CUDA device visible to torch")

    def sm(host: Host, op: str | None, value: int | None) -> tuple[bool, str]:
        c = host.cuda
        if c is None:
            return False, "no CUDA device"
        return compare(c["sm"], op, value), f"{c['name']} is sm_{c['sm']}"

    return {"cuda": cuda, "sm": sm}
