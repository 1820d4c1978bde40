"""What one inference of an ONNX graph must at least do: its multiply-accumulates and the bytes
it moves.

The physical floor (`pipeline.measure.runners.floor`) divides these by the machine's peaks. The
counts are lower bounds on purpose: an unknown shape counts as no work, so a graph the counting
does not understand can only lower the floor, never reject an honest measurement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, shape_inference

from pipeline.core.errors import ModelError

_CONV_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_GEMM_B_INPUT = {"Gemm": 1, "QGemm": 3}
_MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul"}
_INT8_TYPES = {TensorProto.INT8, TensorProto.UINT8}
_FP16_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
_QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
}

Shape = tuple[int, ...]


def onnx_cost(path: Path, input_shape: Sequence[int]) -> dict[str, Any]:
    """Multiply-accumulates and bytes of an ONNX graph for one input shape.

    Conv-like ops count `out_elems * (Cin / groups) * kh * kw`; Gemm and MatMul count
    `M * N * K`; the quantized forms (QLinearConv, ConvInteger, QGemm, QLinearMatMul,
    MatMulInteger) count the same. Weights count at their stored type's size, and a float
    weight that only feeds a QuantizeLinear counts at 1 byte, since the runtime folds it to
    INT8 at load.

    Args:
        path: The .onnx file.
        input_shape: The full input shape including the batch, e.g. (1, 3, 32, 32).

    Returns:
        `macs`, `weight_bytes`, `activation_bytes` (the graph input plus every tensor computed
        from it), and the flags `int8` / `fp16` (the graph holds such tensors).

    Raises:
        ModelError: The file cannot be read as ONNX or has no input.
    """
    model = _load_with_input_shape(Path(path), tuple(int(d) for d in input_shape))
    graph = model.graph
    shapes, types = _value_types(graph)
    consts = _constant_names(graph)
    return {
        "macs": sum(_node_macs(node, shapes) for node in graph.node),
        "weight_bytes": _weight_bytes(graph),
        "activation_bytes": _activation_bytes(graph, shapes, types, consts),
        "int8": _has_int8(graph, types),
        "fp16": any(t in _FP16_TYPES for t in types.values()),
    }


def _load_with_input_shape(path: Path, input_shape: Shape) -> onnx.ModelProto:
    try:
        # Weights stored externally stay on disk: only their shapes and types are needed.
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise ModelError(f"{path}: cannot read it as an ONNX model ({exc})") from exc
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        raise ModelError(f"{path}: the ONNX graph has no input")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ModelError(
            f"{path}: input '{inputs[0].name}' has rank {len(dims)}, the profile gives "
            f"shape {input_shape}; fix the profile's input.shape"
        )
    for dim, size in zip(dims, input_shape, strict=True):
        dim.Clear()
        dim.dim_value = size
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{path}: ONNX shape inference failed: {exc}") from exc


def _value_types(graph: onnx.GraphProto) -> tuple[dict[str, Shape | None], dict[str, int]]:
    """Shape (None when not fully known) and element type of every named tensor."""
    shapes: dict[str, Shape | None] = {}
    types: dict[str, int] = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim)
        shapes[vi.name] = dims if all(d > 0 for d in dims) else None
        types[vi.name] = tt.elem_type
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape | None]) -> int:
    """Multiply-accumulates of one node; 0 when a shape is unknown (keeps the floor low)."""

    def shape(i: int, outputs: bool = False) -> Shape | None:
        names = node.output if outputs else node.input
        return shapes.get(names[i]) if i < len(names) and names[i] else None

    out = shape(0, outputs=True)
    if node.op_type in _CONV_WEIGHT_INPUT:
        w = shape(_CONV_WEIGHT_INPUT[node.op_type])
        # Weight is (Cout, Cin / groups, kh, kw): each output element costs prod(w[1:]).
        return math.prod(out) * math.prod(w[1:]) if out and w else 0
    if node.op_type == "ConvTranspose":
        x, w = shape(0), shape(1)  # w is (Cin, Cout / groups, kh, kw)
        return math.prod(x) * math.prod(w[1:]) if x and w else 0
    if node.op_type in _GEMM_B_INPUT:
        # From the inputs: shape inference does not know QGemm (com.microsoft) outputs.
        a, b = shape(0), shape(_GEMM_B_INPUT[node.op_type])
        if not (a and b and len(a) == 2 and len(b) == 2):
            return 0
        m = a[1] if _attr(node, "transA") else a[0]
        k_n = b[::-1] if _attr(node, "transB") else b
        return m * k_n[0] * k_n[1]
    if node.op_type in _MATMUL_OPS:
        a = shape(0)  # (..., M, K) @ (..., K, N): each output element costs K
        return math.prod(out) * a[-1] if out and a else 0
    return 0


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def _itemsize(elem_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def _weight_bytes(graph: onnx.GraphProto) -> int:
    """Bytes of the initializers: the parameters the runtime reads on every inference."""
    quantized = _quantize_inputs(graph)
    total = 0
    for init in graph.initializer:
        if init.data_type == TensorProto.INT64:
            continue  # shapes, axes and indices: graph metadata, not weights
        size = 1 if init.name in quantized else _itemsize(init.data_type)
        total += math.prod(init.dims) * size
    return total


def _quantize_inputs(graph: onnx.GraphProto) -> set[str]:
    """Tensors read only as the float input of a QuantizeLinear (folded to INT8 at load)."""
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    other_uses = {
        name
        for n in graph.node
        for i, name in enumerate(n.input)
        if not (n.op_type == "QuantizeLinear" and i == 0)
    }
    return quantized - other_uses


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from weights alone: the runtime folds them, they move no activations."""
    consts = {t.name for t in graph.initializer}
    for node in graph.node:  # ONNX nodes are topologically sorted
        if node.op_type == "Constant" or all(not i or i in consts for i in node.input):
            consts.update(node.output)
    return consts


def _activation_bytes(
    graph: onnx.GraphProto,
    shapes: Mapping[str, Shape | None],
    types: Mapping[str, int],
    consts: set[str],
) -> int:
    names: Iterable[str] = (
        *(i.name for i in graph.input if i.name not in consts),
        *(o for n in graph.node for o in n.output if o and o not in consts),
    )
    total = 0
    for name in names:
        shape = shapes.get(name)
        if shape and name in types and types[name] != TensorProto.UNDEFINED:
            total += math.prod(shape) * _itemsize(types[name])
    return total


def _has_int8(graph: onnx.GraphProto, types: Mapping[str, int]) -> bool:
    return any(n.op_type in _QUANT_OPS for n in graph.node) or any(
        t in _INT8_TYPES for t in types.values()
    )
