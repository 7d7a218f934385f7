"""Built-in data sources: ``images`` (a folder of photos with standard ImageNet
preprocessing, optionally multiplied by seeded random-resized crops) and ``tensors``
(arrays in a .npy or .npz file)."""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, cut
from . import DataSource, digest_files, missing_paths

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: torchvision's ImageNet statistics (RGB, 0..1 scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImagesSource(DataSource):
    """A folder of images -> ``(N, 3, crop, crop)`` float32 in NCHW, RGB.

    Preprocessing is the standard ImageNet evaluation transform: resize the shorter
    side to ``resize`` (bilinear), center-crop ``crop``, scale to [0, 1], subtract
    ``mean`` and divide by ``std`` per channel. With ``crops.per_image > 1`` each image
    also yields seeded random-resized crops (area fraction in [``min_scale``, 1],
    aspect ratio log-uniform in [3/4, 4/3], as torchvision's RandomResizedCrop), which
    multiplies a handful of real photos into a usable calibration/validation set.

    ``labels`` (optional) is a CSV file of ``filename,class_index`` lines; every crop of
    an image gets that image's label.
    """

    name = "images"
    path_options = ("images", "labels")
    description = "folder of images, ImageNet preprocessing, optional seeded random-resized crops"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["images"],
        "properties": {
            "source": {"type": "string", "description": "This source's name (optional: picked by key)."},
            "images": {"type": "string", "minLength": 1, "description": "Folder (relative to the recipe)."},
            "input": {
                "type": "string",
                "description": "Model input fed with the images (default: the first).",
            },
            "labels": {
                "type": "string",
                "description": "CSV 'filename,class_index' (relative to the recipe).",
            },
            "limit": {"type": "integer", "minimum": 1, "description": "Use at most this many samples."},
            "preprocess": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "resize": {
                        "type": "integer", "minimum": 1, "maximum": 8192, "default": 256,
                        "description": "Shorter side after resizing (bilinear), in pixels.",
                    },
                    "crop": {
                        "type": "integer", "minimum": 1, "maximum": 8192, "default": 224,
                        "description": "Side of the center crop, in pixels (must match the input's H and W).",
                    },
                    "mean": {
                        "type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3,
                        "description": "Per-channel mean (RGB, 0..1 scale); default ImageNet's.",
                    },
                    "std": {
                        "type": "array",
                        "items": {"type": "number", "exclusiveMinimum": 0},
                        "minItems": 3,
                        "maxItems": 3,
                        "description": "Per-channel standard deviation (RGB, 0..1 scale); default ImageNet's.",
                    },
                },
            },
            "crops": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "per_image": {
                        "type": "integer", "minimum": 1, "maximum": 1024, "default": 1,
                        "description": "Samples per image: the center crop plus per_image - 1 random-resized crops.",
                    },
                    "min_scale": {
                        "type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.25,
                        "description": "Smallest area fraction of a random-resized crop.",
                    },
                    "seed": {"type": "integer", "minimum": 0, "default": 0, "description": "Seed of the crops."},
                },
            },
        },
    }

    @staticmethod
    def _files(options: dict[str, Any]) -> list[Path]:
        folder = Path(options["images"])
        if not folder.is_dir():
            raise DataError(f"data.images: {describe_path(folder, 'folder')}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"data.images: folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files

    def check(self, options: dict[str, Any]) -> list[tuple[str, str]]:
        """The folder exists and holds images; ``labels``, when set, is a file."""
        folder = Path(options["images"])
        if not folder.is_dir():
            what = f"folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder"
            return [("images", what)]
        out = missing_paths(options, ("labels",))
        if not any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.iterdir()):
            out.append(("images", f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})"))
        return out

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        files = self._files(options)
        ident = {k: v for k, v in options.items() if k not in ("images", "labels")}
        ident["images_sha256"] = digest_files(files)
        if options.get("labels"):
            ident["labels_sha256"] = digest_files([Path(options["labels"])])
        return ident

    def load(self, options: dict[str, Any], signature: Any) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        pre = preprocess_settings(options)
        resize, crop = pre["resize"], pre["crop"]
        crops = options.get("crops", {})
        per_image = crops.get("per_image", 1)
        rng = np.random.default_rng(crops.get("seed", 0))
        input_name = options.get("input") or signature.inputs[0].name
        spec = next((i for i in signature.inputs if i.name == input_name), None)
        if spec is None:
            raise DataError(
                f"data.input: model has no input '{input_name}' (inputs: {', '.join(signature.names)})"
            )
        if len(spec.shape) != 4 or spec.shape[1] != 3 or tuple(spec.shape[2:]) != (crop, crop):
            raise DataError(
                f"data.preprocess.crop: images become (N, 3, {crop}, {crop}) but input '{input_name}' "
                f"has shape {list(spec.shape)}"
            )
        labels_by_name = _read_labels(Path(options["labels"])) if options.get("labels") else None
        samples, labels = [], []
        for path in self._files(options):
            try:
                with Image.open(path) as im:  # Pillow refuses over 2 * MAX_IMAGE_PIXELS before decoding
                    img = im.convert("RGB")
            except Image.DecompressionBombError as e:
                raise DataError(
                    f"data.images: {path} is too large to decode safely ({cut(e, 160)}); "
                    "resize it below Pillow's MAX_IMAGE_PIXELS"
                ) from e
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise DataError(f"data.images: cannot decode {path}: {cut(e, 160)}") from e
            views = [_center(img, resize, crop)]
            for _ in range(per_image - 1):
                views.append(_random_resized(img, crop, crops.get("min_scale", 0.25), rng))
            samples += [normalize(v, pre) for v in views]
            if labels_by_name is not None:
                if path.name not in labels_by_name:
                    raise DataError(f"data.labels: no label for {path.name} in {options['labels']}")
                labels += [labels_by_name[path.name]] * len(views)
        limit = options.get("limit")
        out: dict[str, Any] = {input_name: np.stack(samples[:limit]).astype(np.float32)}
        if labels_by_name is not None:
            out["labels"] = np.asarray(labels[:limit], dtype=np.int64)
        return out


class TensorsSource(DataSource):
    """Arrays from a ``.npy`` (one input) or ``.npz`` (arrays named after the inputs) file.

    Each array's first axis is the sample axis: shape ``(N, *input_shape[1:])``.
    An ``.npz`` may hold ``labels`` of shape ``(N,)`` (int).
    """

    name = "tensors"
    path_options = ("tensors",)
    description = ".npy/.npz arrays, sample axis first"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["tensors"],
        "properties": {
            "source": {"type": "string", "description": "This source's name (optional: picked by key)."},
            "tensors": {
                "type": "string",
                "minLength": 1,
                "description": ".npy (one input) or .npz (arrays named after the inputs), relative to the recipe.",
            },
            "limit": {"type": "integer", "minimum": 1, "description": "Use at most this many samples."},
            "labels_key": {
                "type": "string",
                "default": "labels",
                "description": "Array of the .npz holding integer labels, shape (N,).",
            },
        },
    }

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        p = Path(options["tensors"])
        if not p.is_file():
            raise DataError(f"data.tensors: {describe_path(p, 'file')}")
        return {
            "sha256": digest_files([p]),
            "limit": options.get("limit"),
            "labels_key": options.get("labels_key"),
        }

    def load(self, options: dict[str, Any], signature: Any) -> dict[str, Any]:
        p = Path(options["tensors"])
        try:
            loaded = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"data.tensors: cannot read {p} as .npy/.npz: {cut(e, 160)}") from e
        limit = options.get("limit")
        if isinstance(loaded, np.ndarray):
            arrays = {signature.inputs[0].name: loaded}
        else:
            arrays = {}
            for k in loaded.files:
                try:
                    arrays[k] = loaded[k]
                except ValueError as e:  # an object array (a pickle) under allow_pickle=False
                    raise DataError(
                        f"data.tensors: array '{cut(k)}' in {p} cannot be read without unpickling "
                        f"({cut(e, 160)}); save plain numeric arrays"
                    ) from e
                except (OSError, EOFError, zipfile.BadZipFile) as e:
                    raise DataError(f"data.tensors: array '{cut(k)}' in {p} is unreadable: {cut(e, 160)}") from e
        out: dict[str, Any] = {}
        for spec in signature.inputs:
            if spec.name not in arrays:
                raise DataError(f"data.tensors: {p} has no array '{spec.name}' (has: {', '.join(arrays)})")
            a = np.asarray(arrays[spec.name])
            if a.dtype.kind not in "biuf":
                raise DataError(f"data.tensors: '{spec.name}' in {p} has dtype {a.dtype}; expected numbers")
            if a.ndim >= 1 and len(a) == 0:
                raise DataError(f"data.tensors: '{spec.name}' in {p} holds 0 samples")
            if a.ndim != len(spec.shape) or tuple(a.shape[1:]) != tuple(spec.shape[1:]):
                raise DataError(
                    f"data.tensors: '{spec.name}' in {p} has shape {list(a.shape)}, "
                    f"expected (N, {list(spec.shape[1:])})"
                )
            out[spec.name] = a[:limit].astype(spec.dtype)
        lk = options.get("labels_key", "labels")
        if lk in arrays:
            out["labels"] = np.asarray(arrays[lk][:limit], dtype=np.int64)
        return out


def describe_path(p: Path, expected: str) -> str:
    """Why ``p`` is not the ``expected`` kind of path (``"file"`` or ``"folder"``): it does not
    exist, or it is a directory, a file or something else (a device, a socket)."""
    if not os.path.lexists(p):
        return f"{expected} {p} does not exist"
    if p.is_symlink() and not p.exists():
        return f"{p} is a broken symlink (to {os.readlink(p)})"
    if p.is_dir():
        return f"{p} is a directory, not a {expected}"
    if p.is_file():
        return f"{p} is a file, not a {expected}"
    return f"{p} is not a regular {expected} (a device, socket or pipe)"


def preprocess_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The evaluation transform of an ``images`` dataset's options, defaults filled in:
    ``{"resize": int, "crop": int, "mean": [3 floats], "std": [3 floats]}`` (RGB, 0..1 scale).
    This is what a build records in its out dir (``deploy.json``) for :func:`preprocess_images`."""
    pre = options.get("preprocess") or {}
    return {
        "resize": int(pre.get("resize", 256)),
        "crop": int(pre.get("crop", 224)),
        "mean": [float(v) for v in pre.get("mean", IMAGENET_MEAN)],
        "std": [float(v) for v in pre.get("std", IMAGENET_STD)],
    }


def normalize(view: Any, settings: dict[str, Any]) -> np.ndarray:
    """An RGB PIL image -> ``(3, H, W)`` float32: scaled to [0, 1], minus ``mean``, over ``std``."""
    a = np.asarray(view, dtype=np.float32) / 255.0
    mean = np.asarray(settings["mean"], np.float32)
    std = np.asarray(settings["std"], np.float32)
    return ((a - mean) / std).transpose(2, 0, 1)


def preprocess_images(images: Any, settings: dict[str, Any]) -> np.ndarray:
    """The ``images`` source's evaluation transform applied to ``images`` (paths or PIL images,
    one or a list): resize the shorter side to ``resize``, center-crop ``crop``, :func:`normalize`.

    Returns ``(N, 3, crop, crop)`` float32 (NCHW, RGB), exactly what a build calibrated and
    verified on. Raises :class:`DataError` naming a file that cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    items = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            img = item.convert("RGB")
        else:
            try:
                with Image.open(item) as im:
                    img = im.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise DataError(f"cannot decode image {item}: {e}") from e
        out.append(normalize(_center(img, settings["resize"], settings["crop"]), settings))
    return np.stack(out).astype(np.float32)


def _read_labels(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataError(f"data.labels: {describe_path(path, 'file')}")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            name, idx = (s.strip() for s in line.split(","))
            out[name] = int(idx)
        except ValueError as e:
            raise DataError(f"data.labels: {path}:{n}: expected 'filename,class_index', got '{line}'") from e
    return out


def _center(img: Any, resize: int, crop: int) -> Any:
    from PIL import Image

    w, h = img.size
    s = resize / min(w, h)
    img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def _random_resized(img: Any, crop: int, min_scale: float, rng: np.random.Generator) -> Any:
    from PIL import Image

    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.resize((crop, crop), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    side = min(w, h)
    return img.resize(
        (crop, crop), Image.BILINEAR, box=((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
    )
