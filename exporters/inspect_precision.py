"""Read back from an ONNX graph the precision each policy layer actually runs in.

This is the proof that the graph matches the policy: it looks at what the runtime will execute
(Q/DQ around a weight, QLinear ops, float16 tensors), not at what we asked for.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from exporters.onnx_export import FLOAT_OPS, INT8_OPS, layer_node_map
from pipeline.core.policy import Precision

_FLOAT16 = onnx.TensorProto.FLOAT16


def layer_precisions(
    onnx_path_or_model: Path | str | onnx.ModelProto, layers: list[str]
) -> dict[str, Precision]:
    """The precision each layer runs in according to the graph.

    INT8: the layer's Conv / Gemm / MatMul takes its weight from a DequantizeLinear (QDQ form), or
    the layer became QLinearConv / QLinearMatMul / QGemm / ConvInteger / MatMulInteger (QOperator
    form, e.g. node `/layer1/layer1.0/conv1/Conv_quant`). FP16: its input or weight is float16
    (a float16 initializer, a Cast to float16, or a tensor inferred float16, as
    `exporters.fp16` writes them). Otherwise FP32. A float layer whose *input* passes through
    Q/DQ still computes in FP32.

    Args:
        onnx_path_or_model: An `.onnx` path or a loaded model.
        layers: Module fqns (Conv2d / Linear) as in the policy.

    Returns:
        {fqn -> Precision} for every layer.

    Raises:
        ValueError: Some layers have no node in the graph.
    """
    model = _load(onnx_path_or_model)
    node_names = layer_node_map(model, layers, op_types=(*FLOAT_OPS, *INT8_OPS))
    by_name = {n.name: n for n in model.graph.node}
    nodes = {fqn: by_name[name] for fqn, name in node_names.items()}
    producers = {out: n for n in model.graph.node for out in n.output}
    types = _elem_types(model)
    if any(_data_input(n) not in types for n in nodes.values()):
        types = _elem_types(_with_shapes(model))
    return {fqn: _node_precision(node, producers, types) for fqn, node in nodes.items()}


def _load(source: Path | str | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    # Only dtypes and topology are read: external weight files need not be loaded.
    return onnx.load(str(source), load_external_data=False)


def _data_input(node: onnx.NodeProto) -> str:
    return node.input[0] if node.input else ""


def _node_precision(
    node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], types: dict[str, int]
) -> Precision:
    if node.op_type in INT8_OPS:
        return Precision.INT8
    weight = node.input[1] if len(node.input) > 1 else ""
    source = producers.get(weight)
    if source is not None and source.op_type == "DequantizeLinear":
        return Precision.INT8
    if _FLOAT16 in (types.get(_data_input(node)), types.get(weight)):
        return Precision.FP16
    return Precision.FP32


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type the graph states, by tensor name."""
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            types[node.output[0]] = to
        elif node.op_type == "Constant" and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    # Exported graphs carry few value_infos; inference fills in the activations' dtypes. A graph
    # it cannot handle (custom domains) keeps what it has: unknown types read as FP32.
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:
        return model
