"""What TensorRT requires of an explicitly quantized ONNX graph, checked without TensorRT.

TensorRT builds INT8 from Q/DQ nodes (explicit quantization) and only in its own form: symmetric
signed INT8 (zero point 0, int8 on both sides of every Q/DQ), weights quantized per channel on
their output-channel axis, activations per tensor, and a Conv / Gemm / MatMul runs in INT8 only
when both its data and its weights come through DequantizeLinear. Operator-form INT8
(`QLinearConv`, `ConvInteger`, ...) is ONNX Runtime's and not parsed. The parser of TensorRT 10.0
reads opsets 9 to 20, and per-channel Q/DQ needs 13. A graph that breaks a rule fails on the
device at build time, or builds with layers silently left in float: checking it here, where the
graph is written, saves the trip.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

MIN_OPSET, MAX_OPSET = 13, 20
OPERATOR_FORM = {
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "QGemm",
    "QAttention",
}
LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def check_trt_qdq(path: Path | onnx.ModelProto) -> list[str]:
    """Every way the graph at `path` breaks TensorRT's explicit-quantization rules; [] if none."""
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path))
    graph = model.graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    problems = _opset(model)
    problems += [
        f"{node.op_type} '{node.name}': operator-form INT8, which TensorRT does not parse"
        for node in graph.node
        if node.op_type in OPERATOR_FORM or node.op_type.startswith("QLinear")
    ]
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for node in qdq:
        problems += _symmetric_int8(node, weights)
    for node in graph.node:
        if node.op_type in LINEAR:
            problems += _linear(node, producers, weights)
    problems += [
        f"QuantizeLinear '{n.name}': an activation needs one scale (per tensor)"
        for n in qdq
        if n.op_type == "QuantizeLinear"
        and n.input[0] not in weights
        and weights.get(n.input[1], np.zeros(1)).size != 1
    ]
    return problems


def _opset(model: onnx.ModelProto) -> list[str]:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if MIN_OPSET <= version <= MAX_OPSET:
        return []
    return [f"opset {version}: TensorRT reads Q/DQ graphs of opset {MIN_OPSET} to {MAX_OPSET}"]


def _symmetric_int8(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> list[str]:
    """Zero point given, int8, and 0 everywhere (without one, ONNX means uint8)."""
    where = f"{node.op_type} '{node.name}'"
    data = weights.get(node.input[0])
    if node.op_type == "DequantizeLinear" and data is not None and data.dtype != np.int8:
        return [f"{where}: {data.dtype} input; TensorRT dequantizes int8 only (keep biases float)"]
    if len(node.input) < 3 or not node.input[2]:
        return [f"{where}: no zero point, which ONNX reads as uint8; TensorRT needs int8, 0"]
    zero = weights.get(node.input[2])
    if zero is None:
        return [f"{where}: its zero point is computed, not a constant"]
    if zero.dtype != np.int8:
        return [f"{where}: {zero.dtype} zero point; TensorRT needs int8"]
    if np.any(zero != 0):
        return [f"{where}: zero point {int(zero.flat[np.flatnonzero(zero)[0]])}; TensorRT needs 0"]
    return []


def _linear(
    node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], weights: dict[str, np.ndarray]
) -> list[str]:
    """A linear op with quantized weights: per-channel on the output axis, and its data
    quantized too (TensorRT fuses a Q/DQ pair on each input into one INT8 kernel)."""
    weight_dq = _dequantized(node.input[1], producers)
    if weight_dq is None:  # a float layer; dequantized data feeding it is fine
        return []
    problems = []
    if _dequantized(node.input[0], producers) is None:
        problems.append(f"{node.op_type} '{node.name}': quantized weights but float data")
    scale = weights.get(weight_dq.input[1])
    quantized = weights.get(weight_dq.input[0])
    axis = _output_axis(node)
    if scale is None or quantized is None or axis is None:
        return problems
    where, given = f"{node.op_type} '{node.name}'", _attribute(weight_dq, "axis", 1)
    channels = quantized.shape[axis]
    if scale.size == 1 and channels > 1:
        problems.append(f"{where}: one weight scale; TensorRT wants one per output channel")
    elif scale.size != 1 and (given % quantized.ndim != axis or scale.size != channels):
        problems.append(f"{where}: weight scales on axis {given}; output channels are {axis}")
    return problems


def _dequantized(name: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    node = producers.get(name)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _output_axis(node: onnx.NodeProto) -> int | None:
    """The axis of the weight that indexes output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attribute(node, "transB", 0) else 1
    return 1 if node.op_type == "MatMul" else None


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    found: Iterable[onnx.AttributeProto] = (a for a in node.attribute if a.name == name)
    attribute = next(iter(found), None)
    return default if attribute is None else int(onnx.helper.get_attribute_value(attribute))
