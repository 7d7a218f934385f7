"""Access to the JSON Schemas shipped as package data (``accelc.schemas``)."""

from __future__ import annotations

from typing import Any


def recipe_schema() -> dict[str, Any]:
    """The recipe schema (``schemas/recipe.schema.json``), parsed once per process."""
    from accelc.schemas import load

    return load("recipe")
