"""The output head of the ``transformers`` model source, in its own module so that importing the
source does not import torch (a pickled ``torch.module`` artifact names this class)."""

from __future__ import annotations

from typing import Any

import torch


class EncoderWithHead(torch.nn.Module):
    """A Hugging Face model whose ``forward(input_ids, attention_mask, token_type_ids)`` returns one tensor.

    Inputs are int64 ``(batch, sequence)``; ``attention_mask`` is 1 on real tokens, 0 on padding.
    Output, by head:

    * ``pooling`` ``mean`` / ``cls`` / ``max``: a sentence embedding ``(batch, hidden)`` float32
      (mean over the positions the mask keeps, the first token, or the masked maximum), L2-normalised
      when ``normalize`` (as sentence-transformers' ``Normalize``; a zero vector stays zero);
    * no pooling: ``last_hidden_state`` ``(batch, sequence, hidden)`` for a bare encoder, or the
      model's ``logits`` (``(batch, classes)``, ``(batch, sequence, classes)``...).

    ``output_kind`` (``embedding``, ``hidden_states``, ``logits``) tells verification how to compare
    the outputs. The normalisation divides by ``max(norm, 1e-12)``, as ``F.normalize`` does.
    """

    def __init__(self, model: Any, pooling: str | None, normalize: bool, bare: bool):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        self.bare = bare
        self.output_kind = "embedding" if pooling else ("hidden_states" if bare else "logits")
        self.accelc_output_kind = self.output_kind
        cfg = model.config
        self.accelc_model_config = {
            "model_type": getattr(cfg, "model_type", None),
            "num_attention_heads": getattr(cfg, "num_attention_heads", None),
            "hidden_size": getattr(cfg, "hidden_size", None),
        }

    def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        if not self.bare:
            return out.logits
        h = out.last_hidden_state
        if self.pooling is None:
            return h
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).unsqueeze(-1).to(h.dtype)
        if self.pooling == "cls":
            p = h[:, 0]
        elif self.pooling == "max":
            p = (h + (mask - 1.0) * 1e9).max(dim=1).values
        else:
            p = (h * mask).sum(dim=1) / torch.maximum(mask.sum(dim=1), torch.tensor(1e-9, dtype=h.dtype))
        if self.normalize:
            n = torch.linalg.vector_norm(p, dim=1, keepdim=True)
            p = p / torch.maximum(n, torch.tensor(1e-12, dtype=p.dtype))
        return p
