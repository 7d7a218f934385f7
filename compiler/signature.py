"""The model's input signature: names, shapes, dtypes and dynamic dimensions.

Dynamic dimensions carry ``min``/``opt``/``max`` sizes, which become ONNX dynamic
axes at export and TensorRT optimization profiles at engine build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DynamicDim:
    """One dynamic axis: ``axis`` index, symbolic ``name`` and its min/opt/max sizes."""

    axis: int
    name: str
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class InputSpec:
    """One model input. ``shape`` is the static example shape (batch included)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic: tuple[DynamicDim, ...] = ()

    def shape_with(self, **sizes: int) -> tuple[int, ...]:
        """The example shape with dynamic axes named in ``sizes`` replaced (``batch=8``)."""
        shape = list(self.shape)
        for d in self.dynamic:
            if d.name in sizes:
                shape[d.axis] = sizes[d.name]
        return tuple(shape)

    def batch_dim(self) -> DynamicDim | None:
        """The dynamic axis 0, if axis 0 is dynamic."""
        return next((d for d in self.dynamic if d.axis == 0), None)


@dataclass(frozen=True)
class InputSignature:
    """All inputs of the model, in the order the model's ``forward`` takes them."""

    inputs: tuple[InputSpec, ...]

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def max_batch(self) -> int:
        """Largest batch the signature allows (the static batch when axis 0 is not dynamic)."""
        b = self.inputs[0].batch_dim()
        return b.max if b else self.inputs[0].shape[0]

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "name": i.name,
                "shape": list(i.shape),
                "dtype": i.dtype,
                "dynamic": [d.__dict__ for d in i.dynamic],
            }
            for i in self.inputs
        ]

    @classmethod
    def from_json(cls, items: list[dict[str, Any]]) -> InputSignature:
        return cls(
            tuple(
                InputSpec(
                    name=i["name"],
                    shape=tuple(int(s) for s in i["shape"]),
                    dtype=i.get("dtype", "float32"),
                    dynamic=tuple(
                        DynamicDim(
                            axis=int(d["axis"]),
                            name=d.get("name", f"dim{d['axis']}"),
                            min=int(d["min"]),
                            opt=int(d.get("opt", d["min"])),
                            max=int(d["max"]),
                        )
                        for d in i.get("dynamic", [])
                    ),
                )
                for i in items
            )
        )
