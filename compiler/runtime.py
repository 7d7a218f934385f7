"""``accelc.runtime.load(OUT_DIR)``: run what a build deployed, through the runtime plugin that owns it.

Every successful build writes ``deploy.json`` next to its artifact (:mod:`accelc.deploy`): the
artifact kind, the input signature, the image preprocessing and the resolved recipe.
:func:`load` picks the registered :class:`accelc.runners.Runtime` whose ``kinds`` include the
artifact's kind and wraps its ``predictor`` in a :class:`Predictor`; the core names no runtime.

In an application::

    import accelc.runtime
    predictor = accelc.runtime.load("build/resnet18_cpu_int8")
    x = predictor.preprocess(["cat.jpg", "dog.jpg"])       # (2, 3, 224, 224) float32
    (logits,) = predictor(x)                               # numpy, (2, 1000)
    print(predictor.top_k(logits, k=5))

An out dir without ``deploy.json`` but with a runtime's ``config_file`` (a GPU build's
``runtime.json`` from before ``deploy.json``) is opened by that runtime's own ``load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import RuntimeLoadError
from .signature import InputSignature

__all__ = ["Predictor", "RuntimeLoadError", "load"]


class Predictor:
    """A deployed artifact, loaded: call it with the model's inputs, get numpy outputs.

    Attributes:
        input_names: the recipe's input names, in model order (what :meth:`__call__` takes).
        signature: the recipe's :class:`accelc.signature.InputSignature` (shapes, dtypes, dynamic axes).
        deploy: the out dir's ``deploy.json`` (kind, runtime, preprocessing, resolved recipe).
        runner: the runtime plugin's runner (``run(feeds) -> list[np.ndarray]``).
        class_names: ImageNet-1k's class names (from torchvision's weight metadata) for an image
            recipe, else ``None``; :meth:`top_k` uses them for a 1000-class output only.
    """

    def __init__(self, directory: Path, deploy: dict[str, Any], runner: Any):
        self.directory = Path(directory)
        self.deploy = deploy
        self.runner = runner
        self.signature = InputSignature.from_json(deploy["inputs"])
        self.input_names = self.signature.names

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        """The recipe's image transform (``input``, ``resize``, ``crop``, ``mean``, ``std``), or ``None``."""
        return self.deploy.get("preprocess")

    def preprocess(self, images: Any) -> np.ndarray:
        """Images (paths or PIL images, one or a list) -> ``(N, 3, crop, crop)`` float32, with exactly
        the transform the build calibrated and verified on (:func:`accelc.sources.data.preprocess_images`).

        Raises:
            RuntimeLoadError: the recipe has no ``images`` dataset, so no image preprocessing is known.
            DataError: an image cannot be decoded.
        """
        from .sources.data import preprocess_images

        pre = self.preprocessing
        if not pre:
            raise RuntimeLoadError(
                f"{self.directory}: the recipe has no images dataset, so no image preprocessing is recorded; "
                "feed arrays shaped like the recipe's inputs"
            )
        return preprocess_images(images, pre)

    def feeds(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Inputs (positional in :attr:`input_names` order, or by name; numpy arrays or torch tensors)
        as ``{name: array}`` cast to the recipe's dtypes. Raises ``TypeError`` naming the expected inputs."""
        if args and kwargs:
            raise TypeError(f"pass inputs either positionally or by name ({self.input_names}), not both")
        if kwargs:
            missing = [n for n in self.input_names if n not in kwargs]
            extra = [n for n in kwargs if n not in self.input_names]
            if missing or extra:
                raise TypeError(f"expected inputs {self.input_names}, got {sorted(kwargs)}")
            args = tuple(kwargs[n] for n in self.input_names)
        if len(args) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} input(s) {self.input_names}, got {len(args)}")
        out = {}
        for spec, a in zip(self.signature.inputs, args, strict=True):
            if hasattr(a, "detach"):  # a torch tensor
                a = a.detach().cpu().numpy()
            out[spec.name] = np.ascontiguousarray(np.asarray(a), dtype=spec.dtype)
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        """Run the artifact. Returns every output as a host numpy array, in model order."""
        return [np.asarray(o) for o in self.runner.run(self.feeds(*args, **kwargs))]

    predict = __call__

    @property
    def class_names(self) -> list[str] | None:
        if self.deploy.get("labels") != "imagenet1k":
            return None
        return imagenet_classes()

    def top_k(self, logits: np.ndarray, k: int = 5) -> list[list[tuple[int, str | None, float]]]:
        """Per sample, the ``k`` most probable classes as ``(index, name or None, probability)``
        (softmax over the last axis of ``logits``, shape ``(N, classes)``)."""
        z = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        names = self.class_names if z.shape[1] == 1000 else None
        return [
            [(int(i), names[i] if names else None, float(row[i])) for i in np.argsort(-row)[:k]] for row in p
        ]


def imagenet_classes() -> list[str]:
    """ImageNet-1k class names in index order, as torchvision ships them with its weight metadata
    (nothing is downloaded)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def load(directory: str | Path, **options: Any) -> Any:
    """Load the artifact a build deployed into ``directory`` (its out dir).

    With ``deploy.json`` there, returns a :class:`Predictor` over the runner of the runtime plugin
    whose ``kinds`` include the artifact's kind; ``options`` (``device``, ``threads``) go to it.
    Without it, the runtime whose ``config_file`` is in ``directory`` loads it with its own ``load``
    (``options`` go there: the CUDA-graph runtime takes ``device`` and ``capture``).

    Raises:
        RuntimeLoadError: neither ``deploy.json`` nor a runtime's config file is in ``directory``, no
            registered runtime runs the artifact's kind, or the runtime fails to open it (it says why).
    """
    from .deploy import DEPLOY_NAME, read_deploy
    from .registry import default_registry

    d = Path(directory)
    reg = default_registry()
    deploy = read_deploy(d)
    if deploy is not None:
        kind = deploy["kind"]
        rt = next((r for r in reg.runtimes.values() if kind in r.kinds and r.predictor is not None), None)
        if rt is not None:
            factory = rt.predictor
        elif kind in reg.runners:  # a kind a plugin runs without declaring a runtime
            from .runners import runner_predictor

            factory = runner_predictor(reg.runners[kind])
        else:
            raise RuntimeLoadError(
                f"{d / DEPLOY_NAME}: no installed runtime plugin runs artifact kind '{kind}' "
                f"(runtimes: {', '.join(sorted(reg.runtimes))})"
            )
        if not (d / deploy["artifact"]).is_file():
            raise RuntimeLoadError(f"{d}: {deploy['artifact']} (the deployed artifact) is missing")
        try:
            runner = factory(d, deploy, **options)
        except RuntimeLoadError:
            raise
        except Exception as e:  # runtimes raise their own types; say which file and runtime failed
            raise RuntimeLoadError(
                f"{d / deploy['artifact']}: the {rt.name if rt else kind} runtime cannot load it: "
                f"{type(e).__name__}: {e}"
            ) from e
        return Predictor(d, deploy, runner)
    runtimes = [rt for rt in reg.runtimes.values() if rt.load is not None and rt.config_file]
    for rt in runtimes:
        if (d / rt.config_file).is_file():
            return rt.load(d, **options)
    files = ", ".join([DEPLOY_NAME, *sorted({rt.config_file for rt in runtimes})])
    raise RuntimeLoadError(f"{d}: not found: {files} (the files accelc build writes into its out dir)")
