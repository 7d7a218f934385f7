"""Outlier-channel decomposition for dynamic INT8: a few activation channels stay in float.

Transformer activations carry a handful of *outlier channels*: hidden dimensions whose values
are an order of magnitude larger than the rest in every token (Dettmers et al., "LLM.int8():
8-bit Matrix Multiplication for Transformers at Scale", 2022; Bondarenko et al., "Understanding
and Overcoming the Challenges of Efficient Transformer Quantization", 2021). ONNX Runtime's
dynamic quantization (``DynamicQuantizeLinear``) rounds a MatMul's whole activation to u8 with
one scale per tensor, so one such channel sets the step for all of them. On all-MiniLM-L6-v2 the
feed-forward output MatMul's input (after GELU) reaches 23.4 in one channel of 1536 while the
median channel's maximum is 1.3: that one channel makes the step 4x coarser for the others.

The decomposition is LLM.int8()'s, with the outlier channels chosen once, from calibration
statistics, instead of per call::

    y = x W  =  (x * m) W  +  x[..., idx] W[idx, :]
                 ^ INT8 (dynamic)   ^ float, k channels (k << K)

``m`` is 1 except at the outlier channels ``idx``, where it is 0; the INT8 MatMul then sees an
activation without outliers (and rows ``idx`` of ``W`` multiply zeros). A channel is an outlier
when its absolute maximum over the calibration samples exceeds ``threshold`` times the median
channel's (relative, so it works at any activation scale; LLM.int8() uses an absolute magnitude
of 6 on LLM activations). The float graph computes the same function (to float rounding): the
rewrite changes only what quantization does to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Suffix of the float MatMul each decomposition adds; the quantizer is told to leave these in float.
OUTLIER_MATMUL_SUFFIX = "__accelc_outlier_matmul"


def weight_matmuls(model: Any, exclude: set[str] = frozenset()) -> list[Any]:
    """``MatMul`` nodes of ``model`` (``onnx.ModelProto``) whose second input is a constant 2-D weight
    ``(K, N)``: the ones dynamic quantization turns into INT8, less the names in ``exclude``."""
    inits = {t.name: t for t in model.graph.initializer}
    return [
        n for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
        and n.name not in exclude
    ]


def channel_absmax(
    model_path: Path, batches: list[dict[str, np.ndarray]], tensors: list[str], session: Any
) -> dict[str, np.ndarray]:
    """Per-channel absolute maximum ``(K,)`` float32 of each named activation over ``batches``.

    ``tensors`` are activation names in the model at ``model_path`` (their last axis is the
    channel axis); they are exposed as extra graph outputs of a probe model, run by
    ``session(model bytes)`` (an :class:`accelc.runners.Session` factory) once per batch, so
    memory holds one batch's activations. Raises whatever the session raises on a bad feed.
    """
    import onnx

    from .sensitivity import exposed

    probe, out_names = exposed(onnx.load(str(model_path)), tensors)
    sess = session(probe)
    absmax: dict[str, np.ndarray] = {}
    for feeds in batches:
        values = dict(zip(out_names, sess.run(feeds), strict=True))
        for t in tensors:
            v = values[t]
            m = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0).astype(np.float32)
            absmax[t] = m if t not in absmax else np.maximum(absmax[t], m)
    return absmax


def outlier_channels(absmax: np.ndarray, threshold: float, max_channels: int) -> np.ndarray:
    """Indices (int64, ascending) of the channels whose ``absmax`` exceeds ``threshold`` x the
    median channel's, at most ``max_channels`` of them (the largest)."""
    med = float(np.median(absmax))
    if med <= 0:
        return np.zeros(0, np.int64)
    idx = np.nonzero(absmax > threshold * med)[0]
    if len(idx) > max_channels:
        idx = idx[np.argsort(-absmax[idx])[:max_channels]]
    return np.sort(idx).astype(np.int64)


def _gain(absmax: np.ndarray, idx: np.ndarray) -> float:
    """How many times the activation's absolute maximum shrinks once ``idx`` are split off."""
    rest = np.delete(absmax, idx)
    return float(absmax[idx].max() / max(float(rest.max()) if len(rest) else 1.0, 1e-12))


def decompose_outliers(
    model: Any,
    absmax: dict[str, np.ndarray],
    threshold: float,
    max_channels: int,
    exclude: set[str] = frozenset(),
    min_gain: float = 1.0,
) -> tuple[Any, list[dict[str, Any]]]:
    """A copy of ``model`` (``onnx.ModelProto``) with each weight MatMul's outlier channels split off.

    For each activation ``x`` read by :func:`weight_matmuls` nodes and having outlier channels
    (:func:`outlier_channels` of ``absmax[x]``), one ``Mul(x, mask)`` and one
    ``Gather(x, idx, axis=-1)`` are added (shared by every MatMul reading ``x``, e.g. the Q, K and V
    projections); each such MatMul reads the masked ``x``, and ``MatMul(Gather(x), W[idx])`` (in
    float, node name ending in :data:`OUTLIER_MATMUL_SUFFIX`) is added to its result, when that
    shrinks the activation's absolute maximum at least ``min_gain`` times. When the
    MatMul's only consumer adds a constant bias, the sum is taken after the bias ``Add``, so ONNX
    Runtime still fuses the INT8 MatMul with its bias (``MatMulIntegerToFloat``). Nodes whose
    input has no statistics are left as they are.
    Returns the new model and one record per decomposed node: ``{"node", "channels", "of",
    "absmax_ratio"}`` (the largest outlier's maximum over the largest remaining channel's).
    """
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    targets = weight_matmuls(m, exclude)
    inputs = {n.name: n.input[0] for n in targets}
    # unnamed nodes cannot be told apart in the records
    chosen = {n.name: outlier_channels(absmax[n.input[0]], threshold, max_channels)
              for n in targets if n.name and n.input[0] in absmax}
    chosen = {k: v for k, v in chosen.items() if len(v) and _gain(absmax[inputs[k]], v) >= min_gain}
    graph = list(m.graph.node)
    position = {n.name: k for k, n in enumerate(graph) if n.name}
    consumers: dict[str, list[int]] = {}
    for k, n in enumerate(graph):
        for i in n.input:
            consumers.setdefault(i, []).append(k)
    split_inputs: dict[str, tuple[str, str]] = {}  # x -> (masked x, outlier channels of x)
    after: dict[int, list[Any]] = {}  # graph position -> nodes to insert right after it
    before: dict[int, list[Any]] = {}
    records: list[dict[str, Any]] = []
    for n in targets:
        idx = chosen.get(n.name)
        if idx is None:
            continue
        x, p = n.input[0], n.name
        a = absmax[x]
        if x not in split_inputs:
            tag = f"{x}__accelc"
            mask = np.ones(len(a), np.float32)
            mask[idx] = 0
            m.graph.initializer.extend([numpy_helper.from_array(mask, f"{tag}_inlier_mask"),
                                        numpy_helper.from_array(idx, f"{tag}_outlier_idx")])
            before.setdefault(position[p], []).extend([
                helper.make_node("Mul", [x, f"{tag}_inlier_mask"], [f"{tag}_inliers"], name=f"{tag}_inlier_mask"),
                helper.make_node("Gather", [x, f"{tag}_outlier_idx"], [f"{tag}_outliers"], axis=-1,
                                 name=f"{tag}_outlier_gather"),
            ])
            split_inputs[x] = (f"{tag}_inliers", f"{tag}_outliers")
        inliers, outliers = split_inputs[x]
        w = numpy_helper.to_array(inits[n.input[1]])
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[idx]), f"{p}__accelc_outlier_weight"))
        n.input[0] = inliers
        extra = helper.make_node("MatMul", [outliers, f"{p}__accelc_outlier_weight"], [f"{p}__accelc_outlier_out"],
                                 name=f"{p}{OUTLIER_MATMUL_SUFFIX}")
        users = consumers.get(n.output[0], [])
        at = position[p]
        if len(users) == 1 and graph[users[0]].op_type == "Add" and any(
            i in inits for i in graph[users[0]].input if i != n.output[0]
        ):
            at = users[0]  # the bias Add
        total = graph[at].output[0]
        graph[at].output[0] = f"{p}__accelc_inlier_out"
        after.setdefault(at, []).extend([
            extra,
            helper.make_node("Add", [f"{p}__accelc_inlier_out", f"{p}__accelc_outlier_out"], [total],
                             name=f"{p}__accelc_outlier_add"),
        ])
        records.append(
            {"node": p, "channels": len(idx), "of": int(w.shape[0]), "absmax_ratio": round(_gain(a, idx), 2)}
        )
    nodes: list[Any] = []
    for k, n in enumerate(graph):
        nodes += [*before.get(k, []), n, *after.get(k, [])]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m, records
