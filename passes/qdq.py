"""QDQ graph edits on ``onnx.ModelProto``: keep float nodes in float at run time, remove the
Q/DQ pairs in front of them, prune what no node reads. Used by the quantizer adapter
(:mod:`accelc.passes.quantizer`)."""


from typing import Any

import numpy as np

from .sensitivity import (
    FOLDABLE_ACTIVATIONS,
)


def pin_float_nodes(model: Any) -> list[str]:
    """Keep the Conv/ConvTranspose/Gemm nodes the quantizer left in float in float at run time.

    ONNX Runtime's ``WeightBiasQuantization`` graph transformer (level ``ORT_ENABLE_BASIC`` and
    up) quantizes a float Conv/ConvTranspose/Gemm whose activation input comes from a
    ``DequantizeLinear`` with a per-tensor scale: per-tensor symmetric INT8 weights and an
    INT32 bias, regardless of ``nodes_to_exclude``. On a depthwise convolution with folded
    BatchNorm that is far worse than not excluding the node at all. The transformer only
    matches a scalar-scale ``DequantizeLinear`` producer, so each such node gets its own
    per-axis (axis 1) ``DequantizeLinear`` with the same scale and zero point repeated per
    channel: numerically identical, left alone by the transformer, and the shared one still
    feeds the quantized consumers.

    Edits ``model`` (an ``onnx.ModelProto``) in place; returns the names of the pinned nodes.
    """
    from onnx import helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # per-axis DequantizeLinear needs opset 13
        return []
    g = model.graph
    init = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    pinned: list[tuple[Any, Any]] = []
    for n in g.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 2 or n.input[1] not in init:
            continue
        dq = producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in init or init[dq.input[1]].dims:
            continue
        has_zp = len(dq.input) > 2 and bool(dq.input[2])
        if has_zp and dq.input[2] not in init:
            continue
        w = init[n.input[1]].dims
        attrs = {a.name: a.i for a in n.attribute}
        if n.op_type == "Conv":  # weight (C_out, C_in / group, ...)
            channels = w[1] * attrs.get("group", 1)
        elif n.op_type == "ConvTranspose":  # weight (C_in, C_out / group, ...)
            channels = w[0]
        else:  # Gemm: input (M, K), weight (K, N), or (N, K) with transB
            if attrs.get("transA", 0):
                continue
            channels = w[1] if attrs.get("transB", 0) else w[0]
        base = f"{n.name or n.output[0]}_float_input"
        scale = numpy_helper.to_array(init[dq.input[1]])
        g.initializer.append(numpy_helper.from_array(np.full(channels, scale, scale.dtype), f"{base}_scale"))
        dq_inputs = [dq.input[0], f"{base}_scale"]
        if has_zp:
            zp = numpy_helper.to_array(init[dq.input[2]])
            g.initializer.append(numpy_helper.from_array(np.full(channels, zp, zp.dtype), f"{base}_zero_point"))
            dq_inputs.append(f"{base}_zero_point")
        node = helper.make_node("DequantizeLinear", dq_inputs, [base], name=f"{base}_DequantizeLinear", axis=1)
        n.input[0] = base
        pinned.append((n, node))
    for n, node in pinned:
        g.node.insert(list(g.node).index(n), node)
    prune_dead_nodes(model)  # a shared DequantizeLinear whose every consumer was pinned
    return [n.name for n, _ in pinned]


def unquantize_float_inputs(model: Any, float_model: Any, float_nodes: set[str]) -> list[str]:
    """Remove the QuantizeLinear/DequantizeLinear pairs in front of float nodes.

    Every ``DequantizeLinear`` of an activation (its input written by a ``QuantizeLinear``) whose
    consumers are all float nodes (named in ``float_nodes``; a graph output is not one) is
    bypassed: the consumers read the ``QuantizeLinear``'s float input instead. The pair is then
    dropped by :func:`prune_dead_nodes` unless other (quantized) consumers still read the Q.

    ONNX Runtime's quantizer drops a ``Relu``/``Clip`` whose range the following Q already
    clamps to, and names the producer's output after the activation's. Where the bypassed
    tensor was written by such an activation in ``float_model`` (the model before
    quantization), a copy of it (attributes and bound initializers included) is put back in
    front of the float consumers, so they read exactly the float graph's tensor. A tensor
    whose float-graph producer is missing for any other reason is left quantized.

    Numerically the float nodes then see the producer's unrounded output: one quantization
    error fewer. Edits ``model`` in place; returns the names of the rewired consumers.
    """
    import onnx

    g = model.graph
    float_producer = {o: n for n in float_model.graph.node for o in n.output}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    in_qdq = {n.name for n in g.node}
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    rewired: list[str] = []
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        users = consumers.get(dq.output[0], [])
        if q is None or q.op_type != "QuantizeLinear" or not users or dq.output[0] in outputs:
            continue
        if not all(u.name in float_nodes for u in users):
            continue
        source = q.input[0]
        fp = float_producer.get(source)
        if fp is None or (fp.name not in in_qdq and fp.op_type not in FOLDABLE_ACTIVATIONS):
            continue
        if fp.name not in in_qdq:  # a folded activation: run it in float again
            act = onnx.NodeProto()
            act.CopyFrom(fp)
            act.name = f"{fp.name}_float"
            act.input[0] = source
            act.output[0] = f"{source}_float"
            for extra in list(act.input)[1:]:
                if extra and extra not in inits and extra in float_inits:
                    g.initializer.append(float_inits[extra])
                    inits.add(extra)
            g.node.insert(list(g.node).index(dq), act)
            in_qdq.add(act.name)
            source = act.output[0]
        for u in users:
            for k, name in enumerate(u.input):
                if name == dq.output[0]:
                    u.input[k] = source
            rewired.append(u.name)
    if rewired:
        prune_dead_nodes(model)
    return rewired


def prune_dead_nodes(model: Any) -> int:
    """Remove nodes none of whose outputs is consumed or a graph output (repeatedly, so chains
    such as QuantizeLinear -> DequantizeLinear go together), then unused initializers.
    ONNX Runtime would otherwise still execute them. Edits ``model`` in place; returns the count."""
    g = model.graph
    removed = 0
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return removed

