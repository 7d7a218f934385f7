"""Built-in plugin ``accelc.plugins.transformers``: Hugging Face models and text.

The ``transformers`` model source (a local model directory, ``AutoModel``/``AutoModelFor...``,
offline, safetensors, with the model's own sentence-transformers pooling head) and the ``text``
data source (one sentence per line, tokenised with the model's ``tokenizer.json``). The ONNX
passes that fit these models (``optimize_transformer``, ``quantize_dynamic``) belong to ONNX
Runtime and are registered by :mod:`accelc.plugins.onnxruntime`; the CPU target's pipeline for the
``transformer`` family by :mod:`accelc.plugins.targets`.
"""

from __future__ import annotations

from typing import Any

from accelc.passes.hf_sources import TextSource, TransformersSource

from .hookspecs import hookimpl


@hookimpl
def accelc_register_model_sources() -> list[Any]:
    return [TransformersSource]


@hookimpl
def accelc_register_data_sources() -> list[Any]:
    return [TextSource]
