"""Run a policy's FP16 layers in float16 inside an ONNX graph, with Casts at the boundaries.

The pass works on any graph `export_onnx` or `quantize_onnx` writes (FP32, QDQ or QOperator):

- The Conv / Gemm / MatMul node of every FP16 layer computes in float16: its float inputs are
  float16 (weights converted once, activations through a Cast).
- Ops between layers follow the data: an op whose float activations all come from float16 ops
  runs in float16 too, so a run of FP16 layers (Conv -> Relu -> Add -> Conv) has no Casts inside.
  An op fed by an FP32 or INT8 layer, or by the graph input, stays float32.
- Ops that overflow or lose too much in float16 (normalisations that were not folded, Pow, Exp,
  Softmax, large reductions) stay float32 even inside an FP16 region; their names are returned so
  a report can list them.
- Quantize/DequantizeLinear, custom-domain ops and the graph's inputs and outputs stay float32.

ONNX Runtime's own converter (`onnxruntime.transformers.float16`) is not used: it types *every*
float tensor float16 and wraps blocked nodes in Cast pairs, so tensors between two FP32 layers
would round-trip through float16 and an FP32 layer would not compute on FP32 data.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16

# Ops kept in float32 inside an FP16 region: sums of squares and exponentials overflow float16
# (max 65504) and normalisations divide by them.
FP32_ONLY_OPS = frozenset(
    {
        "BatchNormalization",
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "LpNormalization",
        "Pow",
        "Exp",
        "Softmax",
        "LogSoftmax",
        "ReduceSum",
        "ReduceMean",
        "ReduceSumSquare",
        "ReduceL2",
        "ReduceLogSumExp",
        "ReduceProd",
    }
)
# Ops that never change precision: Q/DQ carry INT8 scales in float32, Cast says its own type,
# shape ops read no values.
_NEUTRAL_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike", "Shape", "Size", "Constant"}
)
_TYPE_AGNOSTIC_INPUTS = frozenset({"Shape", "Size"})  # read only the shape: no Cast needed
_FP16_MAX = float(np.finfo(np.float16).max)


class _Kind(str, Enum):
    FP16 = "fp16"
    KEPT = "kept"  # inside an FP16 region, computed in float32
    FP32 = "fp32"


@dataclass
class Fp16Conversion:
    """What the pass did.

    Attributes:
        model: The converted graph (the input proto, changed in place).
        fp16_nodes: Names of the nodes that compute in float16 (layers and ops between them).
        kept_fp32_nodes: Names of ops inside an FP16 region kept in float32 (`FP32_ONLY_OPS`).
        casts: Number of Cast nodes added at precision boundaries.
    """

    model: onnx.ModelProto
    fp16_nodes: list[str] = field(default_factory=list)
    kept_fp32_nodes: list[str] = field(default_factory=list)
    casts: int = 0


def convert_to_fp16(
    model: onnx.ModelProto, layer_nodes: Collection[str], pinned: Collection[str] = ()
) -> Fp16Conversion:
    """Make the named layer nodes (and the ops between them) compute in float16.

    Args:
        model: A float32 graph, possibly with Q/DQ or QOperator INT8 layers; changed in place.
        layer_nodes: Node names of the FP16 layers' Conv / Gemm / MatMul.
        pinned: Node names that stay float32 whatever feeds them: the other layers' nodes (an
            FP32 layer right after an FP16 one reads float16 data, but computes in float32).

    Returns:
        The conversion record; `model` keeps float32 inputs and outputs.

    Raises:
        ValueError: A named node is not in the graph or cannot compute in float16.
    """
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    missing = sorted(set(layer_nodes) - set(nodes))
    if missing:
        raise ValueError(f"no node named {missing[0]} in the graph")
    opset = _opset(model)
    floats = _float_tensors(model)
    kinds = _assign(graph, set(layer_nodes), set(pinned), floats, opset)
    bad = [name for name in layer_nodes if kinds.get(name) != _Kind.FP16]
    if bad:
        raise ValueError(f"node {bad[0]} cannot compute in float16")
    result = Fp16Conversion(model)
    result.fp16_nodes = [n.name for n in graph.node if kinds.get(n.name) == _Kind.FP16]
    result.kept_fp32_nodes = [n.name for n in graph.node if kinds.get(n.name) == _Kind.KEPT]
    # Ops kept in float32 produce float32 even where type inference could not tell.
    floats |= {n.output[0] for n in graph.node if kinds.get(n.name) == _Kind.KEPT}
    result.casts = _rewrite(model, kinds, floats, opset)
    return result


def _opset(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors: initializers, inputs, and what type inference finds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # unusual graphs: fall back to what the graph states
        inferred = model
    graph = inferred.graph
    floats = {t.name for t in graph.initializer if t.data_type == FLOAT}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.type.tensor_type.elem_type == FLOAT:
            floats.add(info.name)
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and node.attribute else None
        if attr is not None and attr.name == "value" and attr.t.data_type == FLOAT:
            floats.add(node.output[0])
    return floats


def _schema(node: onnx.NodeProto, opset: int) -> onnx.defs.OpSchema | None:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NEUTRAL_OPS:
        return None
    try:
        return onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        return None


def _typed_inputs(node: onnx.NodeProto, opset: int) -> list[int] | None:
    """Input indices that share the type of output 0, when that type may be float16.

    Those are the inputs that must become float16 with the node (a Conv's X, W, B; not a
    Resize's scales or a Reshape's shape). None: the node cannot compute in float16.
    """
    schema = _schema(node, opset)
    if schema is None or not schema.outputs:
        return None
    param = schema.outputs[0].type_str
    allowed = next(
        (c.allowed_type_strs for c in schema.type_constraints if c.type_param_str == param), []
    )
    if "tensor(float16)" not in allowed:
        return None
    formal = schema.inputs
    indices = []
    for i, name in enumerate(node.input):
        spec = formal[min(i, len(formal) - 1)] if formal else None
        if name and spec is not None and spec.type_str == param:
            indices.append(i)
    return indices


def _assign(
    graph: onnx.GraphProto, layers: set[str], pinned: set[str], floats: set[str], opset: int
) -> dict[str, _Kind]:
    """Decide each node's precision in one topological pass (graph.node is topologically sorted).

    `region` holds the tensors an FP16 region produces: outputs of float16 ops and of ops kept
    in float32 inside the region (their consumers still belong to it).
    """
    constants = _constant_tensors(graph)
    region: set[str] = set()
    kinds: dict[str, _Kind] = {}
    for node in graph.node:
        typed = _typed_inputs(node, opset)
        kind = _Kind.FP32
        if typed is not None and node.name not in pinned:
            activations = [
                node.input[i]
                for i in typed
                if node.input[i] not in constants and node.input[i] in floats | region
            ]
            if node.name in layers:
                kind = _Kind.FP16
            elif activations and all(a in region for a in activations):
                kind = _Kind.KEPT if node.op_type in FP32_ONLY_OPS else _Kind.FP16
        kinds[node.name] = kind
        if kind != _Kind.FP32:
            region.update(o for o in node.output[:1] if o)
    return kinds


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs, and what is computed from them only (the exporter's
    Identity copies of shared weights): values that are no activation."""
    constants = {t.name for t in graph.initializer}
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or (inputs and all(i in constants for i in inputs)):
            constants.update(node.output)
    return constants


class _Builder:
    """Shared Cast nodes and float16 initializer copies, created once per tensor."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.casts: list[onnx.NodeProto] = []
        self._made: dict[tuple[str, int], str] = {}

    def as_type(self, name: str, to: int) -> str:
        key = (name, to)
        if key not in self._made:
            init = self.initializers.get(name)
            if to == FLOAT16 and init is not None and init.data_type == FLOAT:
                self._made[key] = self._fp16_initializer(init)
            else:
                suffix = "fp16" if to == FLOAT16 else "fp32"
                out = f"{name}__to_{suffix}"
                self.casts.append(helper.make_node("Cast", [name], [out], name=out, to=to))
                self._made[key] = out
        return self._made[key]

    def _fp16_initializer(self, init: onnx.TensorProto) -> str:
        values = numpy_helper.to_array(init)
        # Clip to float16's range: a huge weight becomes the largest finite value, not inf.
        half = np.clip(values, -_FP16_MAX, _FP16_MAX).astype(np.float16)
        copy = numpy_helper.from_array(half, f"{init.name}__fp16")
        self.graph.initializer.append(copy)
        return copy.name


def _rewrite(model: onnx.ModelProto, kinds: dict[str, _Kind], floats: set[str], opset: int) -> int:
    """Type FP16 nodes' tensors float16 and add Casts where a tensor crosses a boundary."""
    graph = model.graph
    fp16_out = _rename_fp16_graph_outputs(graph, kinds)
    build = _Builder(graph)
    for node in graph.node:
        if kinds.get(node.name) == _Kind.FP16:
            for i in _typed_inputs(node, opset) or []:
                name = node.input[i]
                if name not in fp16_out and (name in floats or name in build.initializers):
                    node.input[i] = build.as_type(name, FLOAT16)
        elif node.op_type not in _TYPE_AGNOSTIC_INPUTS:
            for i, name in enumerate(node.input):
                if name in fp16_out:
                    node.input[i] = build.as_type(name, FLOAT)
    for original, renamed in fp16_out.items():
        if original != renamed:  # a graph output: cast back under its own name
            graph.node.append(
                helper.make_node("Cast", [renamed], [original], name=original, to=FLOAT)
            )
    added = len(build.casts) + sum(o != r for o, r in fp16_out.items())
    graph.node.extend(build.casts)
    _retype_value_info(graph, set(fp16_out.values()))
    _drop_unused_initializers(graph)
    _topological_sort(graph)
    return added


def _rename_fp16_graph_outputs(graph: onnx.GraphProto, kinds: dict[str, _Kind]) -> dict[str, str]:
    """{tensor -> its float16 name} for FP16 nodes' outputs; graph outputs get a new name."""
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}
    for node in graph.node:
        if kinds.get(node.name) != _Kind.FP16 or not node.output[0]:
            continue
        name = node.output[0]
        renamed[name] = f"{name}__fp16" if name in outputs else name
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in outputs and name in renamed:
                node.input[i] = renamed[name]
        for i, name in enumerate(node.output):
            if name in outputs and name in renamed:
                node.output[i] = renamed[name]
    return renamed


def _retype_value_info(graph: onnx.GraphProto, fp16: set[str]) -> None:
    for info in graph.value_info:
        if info.name in fp16 and info.type.HasField("tensor_type"):
            info.type.tensor_type.elem_type = FLOAT16


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after its inputs' producers, keeping the original order."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    nodes = list(graph.node)
    done: set[int] = set()
    order: list[onnx.NodeProto] = []
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            index, expanded = stack.pop()
            if index in done:
                continue
            if expanded:
                done.add(index)
                order.append(nodes[index])
                continue
            stack.append((index, True))
            for name in reversed(nodes[index].input):
                source = producer.get(name)
                if source is not None and source not in done:
                    stack.append((source, False))
    del graph.node[:]
    graph.node.extend(order)
