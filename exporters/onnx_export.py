"""Export a PyTorch model to ONNX and find the graph node of each policy layer.

The legacy TorchScript exporter names every node after the module scope that produced it, e.g.
module `layer1.0.conv1` gives node `/layer1/layer1.0/conv1/Conv`. Those names are how a per-layer
policy (keyed by module fqn) finds its way into the graph, since BatchNorm folding renames the
Conv weights (`onnx::Conv_193`) and erases the parameter names.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from pathlib import Path

import onnx
import torch
from torch import nn

from pipeline.core.artifacts import atomic_path
from pipeline.core.errors import ModelError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17

# Float ops a Conv2d / Linear module exports to (Linear on a 3-D input becomes MatMul + Add).
FLOAT_OPS = ("Conv", "Gemm", "MatMul")
# Ops ONNX Runtime's quantizer turns those into: QOperator format and dynamic quantization.
INT8_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger")
# Input index of the weight for each op; used to recognise a layer by its parameter name.
WEIGHT_INDEX = {op: 1 for op in (*FLOAT_OPS, "ConvInteger", "MatMulInteger")} | {
    "QLinearConv": 3,
    "QLinearMatMul": 3,
    "QGemm": 3,
}


def export_onnx(
    model: nn.Module, input_shape: tuple[int, int, int], path: Path, opset: int = 17
) -> Path:
    """Export a model to ONNX with a dynamic batch axis and check the result.

    Args:
        model: The PyTorch model; exported in eval mode, its training flag is restored after.
        input_shape: (channels, height, width) of one sample.
        path: Where the `.onnx` file goes; written atomically.
        opset: ONNX opset, at least 17.

    Returns:
        `path`.

    Raises:
        ModelError: The model cannot be traced on this input or the graph fails the checker.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path) as tmp:
            _export_checked(model, input_shape, tmp, opset)
    finally:
        model.train(was_training)
    return path


def _export_checked(model: nn.Module, input_shape: tuple[int, int, int], tmp: Path, opset: int):
    # A fixed generator keeps the export deterministic without touching the global RNG.
    gen = torch.Generator().manual_seed(0)
    dummy = torch.randn((1, *input_shape), generator=gen)  # (1, C, H, W)
    # nn.MultiheadAttention's fused inference kernel (ViT's attention, in eval mode without
    # gradients) has no ONNX form; the unfused path computes the same and exports.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated upstream but is the one that keeps module
            # scopes in node names and folds BatchNorm; silence only its notice, only here.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        # A path (not a loaded proto) lets the checker handle models over 2 GB.
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:
        name = type(model).__name__
        raise ModelError(
            f"cannot export {name} to ONNX for input (batch, {', '.join(map(str, input_shape))}): "
            f"{one_line(exc)} (does the model accept this input? see the profile's input.shape)"
        ) from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened, for one-line user errors."""
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def layer_node_map(
    onnx_model: onnx.ModelProto, layers: list[str], op_types: Collection[str] = FLOAT_OPS
) -> dict[str, str]:
    """Map each module fqn (Conv2d / Linear) to the name of its ONNX node.

    Matching goes by module scope in the node name first, then by the weight's parameter name
    (`fc.weight`, present when the exporter did not fold it), then by the bias's parameter name
    on the Add that follows a MatMul (a parent calling `F.linear` with the module's weights, as
    Swin's attention does: the nodes carry the parent's scope and a folded, renamed weight),
    then by a unique last scope segment (a module called from outside its parent), then by a
    unique scope that skips containers never called (a ModuleList's scope is missing from the
    path, as in MaxViT: `blocks.0.layers.0.conv` is `/blocks.0/layers.0/conv`), then by the one
    node left in the parent's scope with a constant weight (Swin V2's qkv, whose bias is a
    computed copy and so has no name).

    Args:
        onnx_model: A graph exported by `export_onnx` (or quantized from one).
        layers: Module fully qualified names, e.g. `layer1.0.conv1`, `classifier.1`.
        op_types: Node types a layer may export to.

    Returns:
        {fqn -> node name} for every layer.

    Raises:
        ValueError: Some layers have no node; the message names them.
    """
    nodes = [n for n in onnx_model.graph.node if n.op_type in op_types]
    producers = {out: n for n in onnx_model.graph.node for out in n.output}
    found: dict[str, str] = {}
    for fqn in layers:
        node = (
            _by_scope(nodes, fqn)
            or _by_weight_name(nodes, fqn, producers)
            or _by_bias_name(onnx_model, nodes, fqn, producers)
        )
        if node is not None:
            found[fqn] = node.name
    # Looser rules second, among the nodes no exact rule took, and only when unambiguous
    for fqn in [f for f in layers if f not in found]:
        taken = set(found.values())
        node = (
            _by_last_segment(nodes, fqn, taken)
            or _by_called_scopes(nodes, fqn, taken)
            or _by_parent_scope(onnx_model, nodes, fqn, taken, producers)
        )
        if node is not None:
            found[fqn] = node.name
    missing = [fqn for fqn in layers if fqn not in found]
    if missing:
        ops = "/".join(op_types)
        raise ValueError(f"no {ops} node in the ONNX graph for layers: {short_list(missing)}")
    return found


def short_list(names: list[str], limit: int = 5) -> str:
    """`a, b, c (and 4 more)`: names for a one-line message."""
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def module_scope(fqn: str) -> str:
    """The node-name scope the TorchScript exporter gives module `fqn`.

    Each ancestor contributes its name from the last non-numeric atom on (as torch's
    `_unqualified_variable_name` does): `features.1.conv.0.0` ->
    `/features/features.1/conv/conv.0/conv.0.0`.
    """
    atoms = fqn.split(".")
    segments = [_unqualified(".".join(atoms[: i + 1])) for i in range(len(atoms))]
    return "/" + "/".join(segments)


def _unqualified(name: str) -> str:
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return name


def _scope_of(node: onnx.NodeProto) -> str:
    return node.name.rsplit("/", 1)[0]


def _by_scope(nodes: list[onnx.NodeProto], fqn: str) -> onnx.NodeProto | None:
    scope = module_scope(fqn)
    # A module called twice gets a second scope `conv1_1`; the first call is the layer.
    return next((n for n in nodes if _scope_of(n) == scope), None)


def _by_weight_name(
    nodes: list[onnx.NodeProto], fqn: str, producers: dict[str, onnx.NodeProto]
) -> onnx.NodeProto | None:
    wanted = f"{fqn}.weight"
    for node in nodes:
        index = WEIGHT_INDEX.get(node.op_type, 1)
        if len(node.input) > index and weight_source(node.input[index], producers) == wanted:
            return node
    return None


def _by_bias_name(
    onnx_model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    fqn: str,
    producers: dict[str, onnx.NodeProto],
) -> onnx.NodeProto | None:
    # The exporter keeps a bias's parameter name even when it deduplicates the value (the name
    # is then an Identity's output), so `proj.bias` still points at the Add after proj's MatMul.
    wanted, candidates = f"{fqn}.bias", {id(n) for n in nodes}
    for add in onnx_model.graph.node:
        if add.op_type != "Add" or wanted not in add.input:
            continue
        for name in add.input:
            source = producers.get(name)
            if source is not None and id(source) in candidates:
                return source
    return None


def weight_source(name: str, producers: dict[str, onnx.NodeProto]) -> str:
    """The initializer behind a weight input, looking through a DequantizeLinear.

    ORT's quantizer names the int8 copy `<weight>_quantized`; the suffix is dropped so the
    parameter name (`fc.weight`) comes back.
    """
    node = producers.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        name = node.input[0]
    return name.removesuffix("_quantized")


def _by_last_segment(
    nodes: list[onnx.NodeProto], fqn: str, taken: set[str]
) -> onnx.NodeProto | None:
    segment = "/" + _unqualified(fqn)
    hits = [n for n in nodes if _scope_of(n).endswith(segment) and n.name not in taken]
    # Only an unambiguous hit is safe: `conv1` alone names a layer in every ResNet block.
    return hits[0] if len(hits) == 1 else None


def _by_called_scopes(
    nodes: list[onnx.NodeProto], fqn: str, taken: set[str]
) -> onnx.NodeProto | None:
    # A scope names only the modules that were called, so some ancestors of `fqn` may be
    # missing from it, never added: the scope's segments are a subsequence of the ancestors'.
    names = module_scope(fqn).strip("/").split("/")
    hits = [
        n for n in nodes
        if n.name not in taken and _is_called_path(_scope_of(n).strip("/").split("/"), names)
    ]  # fmt: skip
    return hits[0] if len(hits) == 1 else None


def _is_called_path(segments: list[str], names: list[str]) -> bool:
    if not segments or segments[-1] != names[-1]:
        return False
    remaining = iter(names[:-1])
    return all(any(seg == name for name in remaining) for seg in segments[:-1])


def _by_parent_scope(
    onnx_model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    fqn: str,
    taken: set[str],
    producers: dict[str, onnx.NodeProto],
) -> onnx.NodeProto | None:
    # A parent calling F.linear puts the node in its own scope; a product of two activations
    # (attention's q @ k) has no constant weight, so one untaken weighted node is this layer.
    scope = module_scope(fqn.rsplit(".", 1)[0]) if "." in fqn else ""  # "": the model's own
    constants = {t.name for t in onnx_model.graph.initializer}

    def weighted(node: onnx.NodeProto) -> bool:
        index = WEIGHT_INDEX.get(node.op_type, 1)
        if len(node.input) <= index:
            return False
        source = producers.get(node.input[index])  # a quantized weight: through its DQ
        name = source.input[0] if source and source.op_type == "DequantizeLinear" else ""
        return (name or node.input[index]) in constants

    hits = [n for n in nodes if n.name not in taken and _scope_of(n) == scope and weighted(n)]
    return hits[0] if len(hits) == 1 else None
