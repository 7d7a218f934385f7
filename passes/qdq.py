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


def unquantize_float_inputs(
    model: Any,
    float_model: Any,
    float_nodes: set[str],
    only_after_float: bool = False,
    op_types: set[str] | frozenset[str] | None = None,
) -> list[str]:
    """Remove the QuantizeLinear/DequantizeLinear pairs in front of float nodes.

    Every ``DequantizeLinear`` of an activation (its input written by a ``QuantizeLinear``) whose
    consumers are all float nodes (named in ``float_nodes``; a graph output is not one) is
    bypassed: the consumers read the ``QuantizeLinear``'s float input instead. The pair is then
    dropped by :func:`prune_dead_nodes` unless other (quantized) consumers still read the Q.

    ONNX Runtime's quantizer drops a ``Relu``/``Clip`` whose range the following Q already
    clamps to, and names the producer's output after the activation's. Where the bypassed
    tensor was written by such an activation in ``float_model`` (the model before
    quantization), a copy of it (attributes and bound initializers included) is put back in
    front of the float consumers, so they read exactly the float graph's tensor (with the
    ``Constant`` nodes that bind its bounds, where the export wrote those). A tensor
    whose float-graph producer is missing for any other reason is left quantized.

    Numerically the float nodes then see the producer's unrounded output: one quantization
    error fewer. With ``only_after_float`` a pair is bypassed only where nothing INT8 writes it:
    its tensor is a graph input, or its producer is a float node or reads no dequantized
    tensor (ONNX Runtime's layout keeps the pair after an INT8 node, which fuses with the Q).
    With ``op_types`` (the op types the quantizer quantizes), a consumer of another type counts
    as float too.
    Edits ``model`` in place; returns the names of the rewired consumers.
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
    graph_inputs = {i.name for i in g.input}
    rewired: list[str] = []
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        users = consumers.get(dq.output[0], [])
        if q is None or q.op_type != "QuantizeLinear" or not users or dq.output[0] in outputs:
            continue
        if not all(u.name in float_nodes or (op_types is not None and u.op_type not in op_types) for u in users):
            continue
        source = q.input[0]
        if only_after_float and _int8_producer(producer.get(source), producer, float_nodes):
            continue
        fp = float_producer.get(source)
        if source in graph_inputs:
            fp = None
        elif fp is None or (fp.name not in in_qdq and fp.op_type not in FOLDABLE_ACTIVATIONS):
            continue
        if fp is not None and fp.name not in in_qdq:  # a folded activation: run it in float again
            act = onnx.NodeProto()
            act.CopyFrom(fp)
            act.name = f"{fp.name}_float"
            act.input[0] = source
            act.output[0] = f"{source}_float"
            at = list(g.node).index(dq)
            for extra in list(act.input)[1:]:
                if not extra or extra in inits or extra in producer:
                    continue
                if extra in float_inits:
                    g.initializer.append(float_inits[extra])
                    inits.add(extra)
                elif extra in float_producer and float_producer[extra].op_type == "Constant":
                    # TorchScript exports bind Clip bounds with Constant nodes, not initializers
                    const = onnx.NodeProto()
                    const.CopyFrom(float_producer[extra])
                    g.node.insert(at, const)
                    at += 1
                    producer[extra] = const
            g.node.insert(at, act)
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


def _float_graph_outputs(model: Any, float_nodes: set[str]) -> None:
    """Where a float node's output reaches a graph output only through a Q/DQ pair, let the node
    write the graph output itself (edits ``model`` in place)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in [n for n in g.node if n.name in float_nodes]:
        q = consumers.get(n.output[0], [])
        if len(q) != 1 or q[0].op_type != "QuantizeLinear" or n.output[0] in outputs:
            continue
        dq = consumers.get(q[0].output[0], [])
        if len(dq) != 1 or dq[0].op_type != "DequantizeLinear" or dq[0].output[0] not in outputs:
            continue
        if consumers.get(dq[0].output[0]):
            continue
        n.output[0] = dq[0].output[0]
        g.node.remove(q[0])
        g.node.remove(dq[0])


def _int8_producer(node: Any, producer: dict[str, Any], float_nodes: set[str]) -> bool:
    """Whether ``node`` (``None``: a graph input) runs in INT8: it is not a float node and reads a
    ``DequantizeLinear``'s output."""
    if node is None or node.name in float_nodes:
        return False
    return any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input)


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



def float_units(
    qdq_model: Any,
    float_model: Any,
    nodes: list[str] | set[str],
    float_nodes: set[str] | None = None,
    op_types: set[str] | frozenset[str] | None = None,
) -> list[str]:
    """Run the named quantized nodes of ``qdq_model`` in float again, everything else as it is.

    Graph surgery instead of a new ``quantize_static`` call with ``nodes_to_exclude``: each
    named node's weight and bias inputs that come through a ``DequantizeLinear`` of an
    initializer (INT8 weight, INT32 bias) are replaced by the float model's initializers of the
    same node (same node names, as ``quantize_static`` keeps them). Its activation input keeps
    reading the ``DequantizeLinear`` (ONNX Runtime's layout for a float node after an INT8 one:
    the producer still fuses into one INT8 op) and its output keeps its Q/DQ pair, so an
    activation the quantizer folded into the node (a ``Relu``/``Clip`` whose range the Q clamps
    to) is still applied, by that Q. The other layers keep what they had, bias-corrected biases
    included. A Q/DQ pair between float nodes (``nodes`` and ``float_nodes``, the nodes already
    float in ``qdq_model``, folded activations included; with ``op_types``, the op types the
    quantizer quantizes, nodes of other types too), between a graph input and float nodes, or
    between a float node and a graph output is removed, as ``quantize_static`` leaves none there
    (:func:`unquantize_float_inputs` with ``only_after_float``). Unused Q/DQ nodes and
    initializers are then pruned; pinning the float Conv/Gemm nodes (:func:`pin_float_nodes`) is
    the caller's, after any further layout edit.

    Edits ``qdq_model`` (an ``onnx.ModelProto``) in place; returns the names of the nodes made
    float (named nodes with nothing quantized to restore are left out).

    A named node missing from ``qdq_model`` (an activation the quantizer folded) only counts as float.

    Raises:
        ValueError: a named node is not in the float model, or has fewer inputs there.
    """
    import onnx

    g = qdq_model.graph
    q_nodes = {n.name: n for n in g.node}
    f_nodes = {n.name: n for n in float_model.graph.node}
    f_inits = {i.name: i for i in float_model.graph.initializer}
    float_nodes = set(nodes) | set(float_nodes or ())
    missing = sorted(n for n in nodes if n not in f_nodes)
    if missing:
        raise ValueError(f"float_units: no node named {', '.join(missing)} in the float model")
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    restored: list[str] = []
    for name in nodes:
        if name not in q_nodes:  # an activation the quantizer folded into its producer
            continue
        qn, fn = q_nodes[name], f_nodes[name]
        if len(fn.input) < len(qn.input):
            raise ValueError(f"float_units: node '{name}' has {len(fn.input)} inputs in the float model, "
                             f"{len(qn.input)} in the QDQ model")
        changed = False
        for k, t in enumerate(qn.input):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            src = fn.input[k]
            if src not in f_inits:
                continue
            fresh = src if src not in producer else f"{src}_float"  # ORT names a bias's DQ output after it
            if fresh not in inits:
                init = onnx.TensorProto()
                init.CopyFrom(f_inits[src])
                init.name = fresh
                g.initializer.append(init)
                inits.add(fresh)
            qn.input[k] = fresh
            changed = True
        if changed:
            restored.append(name)
    if restored:
        # as quantize_static lays out excluded nodes: no Q/DQ pair between float nodes, nor
        # between a float node and a graph output
        _float_graph_outputs(qdq_model, set(restored))
        unquantize_float_inputs(qdq_model, float_model, set(float_nodes), only_after_float=True, op_types=op_types)
        prune_dead_nodes(qdq_model)
    return restored
