"""Comparison metrics that fit the kind of output a model has.

* ``classes`` ``(N, C)`` logits: top-1 agreement, cosine, abs errors (and accuracy with labels)
  (:func:`accelc.passes.verification.compare_outputs`).
* ``embedding`` ``(N, D)``: cosine per sample (mean and min) and nearest-neighbour agreement:
  ``neighbor_recall`` is the mean over samples of the share of each sample's ``k`` nearest FP32
  neighbours (cosine, among the other validation samples) that are also among its ``k`` nearest
  neighbours in the compared outputs (recall@k). No top-1: an arg-max over embedding dimensions
  means nothing.
* ``hidden_states`` ``(N, S, D)``: the same, with padded positions (``attention_mask == 0``)
  left out: per-sample cosine over the kept tokens, per-token cosine min, abs errors over kept
  tokens, and neighbour recall on the masked mean of the tokens.

A reference whose outputs do not vary over the samples (all zeros, or the same vector for every
input, as an untrained head gives) makes every score perfect whatever the compared model does:
:func:`degenerate_reason` says so, and verification fails (or warns, by recipe choice) instead of
passing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Output kinds :func:`compare_by_kind` knows.
OUTPUT_KINDS = ("classes", "embedding", "hidden_states", "other")


def infer_output_kind(ref: np.ndarray, declared: str | None = None, labels: np.ndarray | None = None) -> str:
    """The output kind: ``declared`` when the model source stated one (``embedding``,
    ``hidden_states``; ``logits`` counts as ``classes`` when 2-D), else ``classes`` for 2-D outputs
    (the image-classifier default), ``hidden_states`` for 3-D and ``other`` for the rest."""
    if declared in ("embedding", "hidden_states", "classes", "other"):
        return declared
    if ref.ndim == 2:
        return "classes"
    if ref.ndim == 3 and declared != "logits":
        return "hidden_states"
    return "other"


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of ``a`` and ``b`` ``(N, D)`` float (float64 result, ``(N,)``).
    Two zero rows count as equal (1.0); a zero row against a non-zero one as 0.0."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-300), 0.0)
    return np.where(both_zero, 1.0, cos)


def neighbors(x: np.ndarray, k: int) -> np.ndarray:
    """Indices ``(N, k)`` of each row's ``k`` nearest other rows of ``x`` ``(N, D)`` by cosine
    similarity, nearest first (ties broken by index: ``np.argsort`` stable)."""
    x = x.astype(np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.maximum(n, 1e-300)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def neighbor_recall(ref: np.ndarray, out: np.ndarray, k: int = 5) -> float:
    """Recall@k of nearest neighbours: mean over samples of ``|NN_k(ref) ∩ NN_k(out)| / k``, with
    neighbours taken among the other samples of the set (``ref``/``out`` ``(N, D)``; ``k`` is
    capped at ``N - 1``). 1.0 when every sample keeps its FP32 neighbours."""
    n = len(ref)
    k = min(k, n - 1)
    if k < 1:
        return 1.0
    a, b = neighbors(ref, k), neighbors(out, k)
    return float(np.mean([len(set(r) & set(o)) / k for r, o in zip(a, b, strict=True)]))


def degenerate_reason(ref: np.ndarray, mask: np.ndarray | None = None) -> str | None:
    """Why ``ref`` ``(N, ...)`` cannot judge a comparison, or ``None`` when it can.

    Degenerate: fewer than 2 samples; all outputs zero; or every sample's output the same (the
    largest spread over samples of any output element at most 1e-6 of the largest magnitude),
    as a zero-initialised classifier head gives. Masked positions (``mask`` ``(N, S)`` 0) are
    ignored for ``(N, S, D)`` outputs.
    """
    r = ref.astype(np.float64)
    if len(r) < 2:
        return None
    if mask is not None and r.ndim == 3:
        keep = mask.astype(bool)
        tokens = r[keep]
        if tokens.size == 0:
            return "every position is masked"
        scale = float(np.abs(tokens).max())
        spread = float((tokens.max(0) - tokens.min(0)).max())
    else:
        flat = r.reshape(len(r), -1)
        scale = float(np.abs(flat).max())
        spread = float((flat.max(0) - flat.min(0)).max())
    if scale == 0.0:
        return "the source model outputs all zeros"
    if spread <= 1e-6 * scale:
        return f"the source model gives the same output for every sample (spread {spread:.3g}, scale {scale:.3g})"
    return None


def compare_embeddings(ref: np.ndarray, out: np.ndarray, k: int = 5) -> dict[str, Any]:
    """Metrics of sentence/image embeddings ``out`` against ``ref``, both ``(N, D)`` float.

    Returns ``samples``, ``cosine`` (mean per-sample cosine), ``cosine_min``, ``neighbor_recall``
    (recall@``recall_k``, see :func:`neighbor_recall`), ``recall_k``, ``max_abs_error``,
    ``mean_abs_error``.
    """
    cos = cosine_rows(ref, out)
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    return {
        "samples": int(len(ref)),
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "neighbor_recall": neighbor_recall(ref, out, k),
        "recall_k": int(min(k, max(len(ref) - 1, 0))),
        "max_abs_error": float(diff.max()),
        "mean_abs_error": float(diff.mean()),
    }


def compare_hidden_states(
    ref: np.ndarray, out: np.ndarray, mask: np.ndarray | None = None, k: int = 5
) -> dict[str, Any]:
    """Metrics of token outputs ``out`` against ``ref``, both ``(N, S, D)`` float, over the positions
    ``mask`` ``(N, S)`` keeps (all when ``None``).

    Returns ``samples``, ``tokens`` (kept positions), ``cosine`` (mean per-sample cosine over its
    kept tokens, flattened), ``cosine_min``, ``token_cosine_min``, ``max_abs_error`` and
    ``mean_abs_error`` over kept tokens, and ``neighbor_recall`` / ``recall_k`` on the masked
    mean of each sample's tokens.
    """
    r, o = ref.astype(np.float64), out.astype(np.float64)
    keep = np.ones(r.shape[:2], bool) if mask is None else mask.astype(bool)
    w = keep[..., None].astype(np.float64)
    per_sample = cosine_rows((r * w).reshape(len(r), -1), (o * w).reshape(len(o), -1))
    tok_cos = cosine_rows(r[keep], o[keep])
    diff = np.abs(r[keep] - o[keep])
    count = np.maximum(w.sum(1), 1.0)
    return {
        "samples": int(len(r)),
        "tokens": int(keep.sum()),
        "cosine": float(per_sample.mean()),
        "cosine_min": float(per_sample.min()),
        "token_cosine_min": float(tok_cos.min()),
        "neighbor_recall": neighbor_recall((r * w).sum(1) / count, (o * w).sum(1) / count, k),
        "recall_k": int(min(k, max(len(r) - 1, 0))),
        "max_abs_error": float(diff.max()),
        "mean_abs_error": float(diff.mean()),
    }


def _finite_rows(x: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """``(N,)`` bool: samples of ``x`` ``(N, ...)`` with only finite values (over the positions ``keep``
    ``(N, S)`` marks, for ``(N, S, D)`` outputs)."""
    if keep is not None:
        return np.array([np.isfinite(x[i][keep[i]]).all() for i in range(len(x))], dtype=bool)
    return np.isfinite(x.reshape(len(x), -1)).all(1)


def compare_by_kind(
    ref: np.ndarray,
    out: np.ndarray,
    kind: str,
    *,
    labels: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    k: int = 5,
) -> dict[str, Any]:
    """Metrics fitting ``kind`` (:data:`OUTPUT_KINDS`), plus ``output_kind`` and, when the
    reference is degenerate, ``degenerate_reference`` (the reason). ``classes`` and ``other``
    use :func:`accelc.passes.verification.compare_outputs` (``other`` without top-1).

    Non-finite outputs are handled as :func:`accelc.passes.verification.compare_outputs` does for
    every kind: ``nonfinite_samples`` counts the samples where either output holds a NaN or an
    infinity (over kept positions for hidden states), ``reference_nonfinite_samples`` those of the
    reference, the metrics are taken over the other samples (``None`` when none is left), and
    :func:`accelc.tolerances.tolerance_failures` fails any result with non-finite samples.
    Raises :class:`accelc.errors.VerificationError` when the shapes differ.
    """
    from accelc.errors import VerificationError

    from .verification import compare_outputs

    if ref.shape != out.shape:
        raise VerificationError(f"output shape {list(out.shape)} differs from the source model's {list(ref.shape)}")
    hidden = kind == "hidden_states" and ref.ndim == 3
    if hidden and mask is not None and mask.shape != ref.shape[:2]:
        mask = None
    if (kind == "embedding" and ref.ndim == 2) or hidden:
        keep = mask.astype(bool) if hidden and mask is not None else None
        ref_ok, out_ok = _finite_rows(ref, keep), _finite_rows(out, keep)
        finite = ref_ok & out_ok
        counts = {
            "nonfinite_samples": int((~finite).sum()),
            "reference_nonfinite_samples": int((~ref_ok).sum()),
        }
        r, o = ref[finite], out[finite]
        if len(r) == 0:
            names = ("cosine", "cosine_min", "neighbor_recall", "max_abs_error", "mean_abs_error")
            m: dict[str, Any] = dict.fromkeys(names)
            m["recall_k"] = 0
        elif hidden:
            m = compare_hidden_states(r, o, None if mask is None else mask[finite], k)
        else:
            m = compare_embeddings(r, o, k)
        m.update(samples=int(len(ref)), **counts)
        ref_for_reason, mask_for_reason = r, (None if mask is None or not hidden else mask[finite])
    else:
        m = compare_outputs(ref, out, labels)
        if kind != "classes":
            m.pop("top1_agreement", None)
            m.pop("flip_margin", None)
        rows = np.isfinite(ref.reshape(len(ref), -1)).all(1)
        ref_for_reason, mask_for_reason = ref[rows], None
    m["output_kind"] = kind
    reason = degenerate_reason(ref_for_reason, mask_for_reason)
    if reason:
        m["degenerate_reference"] = reason
    return m
