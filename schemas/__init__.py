"""JSON Schemas shipped with accelc (package data). ``load(name)`` reads one by file stem."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def load(name: str) -> dict[str, Any]:
    """Return the parsed schema ``<name>.schema.json`` from this package."""
    return json.loads(resources.files(__name__).joinpath(f"{name}.schema.json").read_text())
