"""Edits of the ONNX graph around ONNX Runtime's quantizer, so that the quantized graph runs
exactly the policy: before it, what to give it (constants shared by layers of different
precisions, Relus it may fold); after it, float layers fed the float tensors again.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from exporters.onnx_export import FLOAT_OPS
from pipeline.core.profile import Int8Scheme


def foldable_relus(
    model: onnx.ModelProto,
    int8_nodes: set[str],
    overrides: dict[str, list[dict[str, np.ndarray]]],
    scheme: Int8Scheme,
) -> list[str]:
    """The Relu (and ReLU6: Clip at 0) nodes the quantizer may fold into the INT8 layer
    before them.

    Quantized on its own, an INT8 Conv's output is dequantized, clipped by the float Relu and
    quantized again for the next layer: a DequantizeLinear -> QuantizeLinear pair per Relu that
    ONNX Runtime does not fuse (about 8% of a pruned ResNet-18's INT8 latency at 48x48 here).
    Given the Relu too, the quantizer drops it and quantizes the Conv's output once, with the
    Relu output's calibrated range: its zero point is then 0, so the clamp at 0 does the Relu's
    work (and a ReLU6's top is the range's top, where the next layer's input clamped anyway).

    Only where that is exact: unsigned activations (a symmetric range has no clamp at 0), a Relu
    fed by an INT8 layer alone, no float layer reading its output (those read the float tensor
    before the Q -> DQ pair, which would then be the Conv's, unclipped), and no imposed scale
    on either side (QAT learned those for the two tensors as they were).
    """
    if scheme.activation_type != "uint8":
        return []
    producers = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    constants = {t.name: t for t in model.graph.initializer}
    folded = []
    for node in model.graph.node:
        if not node.name or not _clips_at_zero(node, constants):
            continue
        source, result = node.input[0], node.output[0]
        producer = producers.get(source)
        readers = consumers.get(result, [])
        if (
            producer is not None
            and producer.name in int8_nodes
            and len(consumers.get(source, [])) == 1
            and source not in overrides
            and result not in overrides
            and result not in outputs
            and not any(r.op_type in FLOAT_OPS and r.name not in int8_nodes for r in readers)
        ):
            folded.append(node.name)
    return folded


def _clips_at_zero(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> bool:
    """A Relu, or a Clip whose lower bound is a constant 0 (ReLU6): an unsigned range
    calibrated on its output starts at 0 either way."""
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip":
        return False
    if len(node.input) < 2 or node.input[1] not in constants:  # opset < 11 or no lower bound
        return False
    low = numpy_helper.to_array(constants[node.input[1]])
    return low.size == 1 and float(low.reshape(-1)[0]) == 0.0


def unshare_initializers(model: onnx.ModelProto) -> None:
    """Give each Conv / Gemm / MatMul its own copy of any initializer it shares.

    ORT's pre-pass merges identical constants (e.g. the all-zero biases of BN-folded convs), and
    the quantizer rewrites a shared initializer for all its consumers: an FP32 layer would then
    read a bias quantized with an INT8 neighbour's scales.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input if name in initializers)
    for node in graph.node:
        if node.op_type not in FLOAT_OPS:
            continue
        for k, name in enumerate(node.input):
            if uses.get(name, 0) > 1:
                uses[name] -= 1
                copy = graph.initializer.add()
                copy.CopyFrom(initializers[name])
                copy.name = f"{name}__{node.name}"
                node.input[k] = copy.name


def unquantize_float_inputs(model: onnx.ModelProto, float_nodes: set[str]) -> None:
    """Feed FP32 layers the float tensor where the quantizer put a Q -> DQ pair in front.

    In QDQ form the quantizer rewires *every* consumer of an activation it quantizes, so an FP32
    layer sharing its input with an INT8 one (ResNet's downsample branch) would read rounded
    values. Dequantized outputs of real INT8 ops (QOperator) are left alone.
    """
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.name not in float_nodes:
            continue
        for k, name in enumerate(node.input):
            source = fake_quant_source(name, producers)
            if source is not None:
                node.input[k] = source
    drop_dead_qdq(model)


def fake_quant_source(name: str, producers: dict[str, onnx.NodeProto]) -> str | None:
    """The float tensor `x` when `name` is the output of DequantizeLinear(QuantizeLinear(x))."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def drop_dead_qdq(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used
        ]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
