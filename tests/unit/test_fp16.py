"""FP16 layers inside the ONNX graph: float16 where the policy says, Casts only at boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exporters import compare_logits, export_onnx, layer_precisions, quantize_onnx, run_onnx
from exporters.fp16 import FP32_ONLY_OPS, convert_to_fp16
from exporters.inspect_precision import _elem_types, _with_shapes
from exporters.onnx_export import layer_node_map
from pipeline.core.policy import Precision, policy_layers
from pipeline.core.profile import Int8Scheme, Tolerances
from pipeline.model.evaluate import stack

SHAPE = (3, 32, 32)
INT8, FP16, FP32 = Precision.INT8, Precision.FP16, Precision.FP32
SCHEME = Int8Scheme(calib_samples=8)


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def _casts(path: Path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "Cast"]


def _activation_casts(path: Path) -> list[onnx.NodeProto]:
    """Casts of computed tensors: not of weights (initializers or Identity copies of them)."""
    proto = onnx.load(str(path))
    constants = {t.name for t in proto.graph.initializer}
    constants |= {n.output[0] for n in proto.graph.node if n.op_type == "Identity"}
    return [n for n in _casts(path) if n.input[0] not in constants]


def _io_types(path: Path) -> list[int]:
    graph = onnx.load(str(path)).graph
    return [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)]


@pytest.fixture
def tiny_fp32(tmp_path, tiny_resnet) -> tuple[list[str], Path]:
    return policy_layers(tiny_resnet), export_onnx(tiny_resnet, SHAPE, tmp_path / "fp32.onnx")


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_mixed_policy_gives_one_graph_that_matches_it(tiny_fp32, tmp_path, fmt):
    layers, fp32 = tiny_fp32
    cycle = (INT8, FP16, FP32)
    precisions = {name: cycle[i % 3] for i, name in enumerate(layers)}
    out = tmp_path / "mixed.onnx"
    report = quantize_onnx(fp32, out, precisions, SCHEME.model_copy(update={"format": fmt}),
                           _inputs(8))  # fmt: skip
    onnx.checker.check_model(str(out), full_check=True)
    assert layer_precisions(out, layers) == precisions
    assert report["fp16_layers"] == [n for n in layers if precisions[n] == FP16]
    assert report["int8_layers"] == [n for n in layers if precisions[n] == INT8]
    assert report["kept_fp32_nodes"] == []  # BatchNorm is folded into the convs
    assert _io_types(out) == [TensorProto.FLOAT, TensorProto.FLOAT]
    logits = run_onnx(out, _inputs(3, seed=1))
    assert logits.shape == (3, 10) and np.isfinite(logits).all()


def test_fp32_layers_compute_in_fp32_and_casts_sit_only_at_the_fp16_layer(tiny_fp32, tmp_path):
    layers, fp32 = tiny_fp32
    precisions = {**dict.fromkeys(layers, FP32), "fc": FP16}
    out = tmp_path / "fc16.onnx"
    quantize_onnx(fp32, out, precisions, SCHEME, _inputs(4))
    assert layer_precisions(out, layers) == precisions
    # One Cast into the head (its input), one out of it (the logits keep their FP32 name).
    casts = _casts(out)
    assert len(casts) == 2, [c.name for c in casts]
    assert {c.output[0] for c in casts} >= {"logits"}
    proto = onnx.load(str(out))
    types = _elem_types(_with_shapes(proto))
    nodes = {n.name: n for n in proto.graph.node}
    for fqn, node in layer_node_map(proto, layers[:-1]).items():
        assert {types[name] for name in nodes[node].input} == {TensorProto.FLOAT}, fqn


def test_an_all_fp16_network_has_no_casts_between_layers(tiny_fp32, tmp_path):
    layers, fp32 = tiny_fp32
    out = tmp_path / "fp16.onnx"
    report = quantize_onnx(fp32, out, dict.fromkeys(layers, FP16), SCHEME, _inputs(1))
    assert report["calib_samples"] == 0  # no INT8 layer: no calibration
    assert layer_precisions(out, layers) == dict.fromkeys(layers, FP16)
    # Residual Adds, ReLUs and pooling follow their FP16 producers: only the graph's own input
    # and output are cast.
    assert sorted(c.output[0] for c in _activation_casts(out)) == ["input__to_fp16", "logits"]
    inputs = _inputs(6, seed=2)
    np.testing.assert_allclose(run_onnx(out, inputs), run_onnx(fp32, inputs), atol=2e-2)


def test_fp16_agrees_with_fp32_within_the_fp16_tolerance(trained_tiny_resnet, digits_splits,
                                                         tmp_path):  # fmt: skip
    model = trained_tiny_resnet
    layers = policy_layers(model)
    fp32 = export_onnx(model, SHAPE, tmp_path / "fp32.onnx")
    out = tmp_path / "fp16.onnx"
    quantize_onnx(fp32, out, dict.fromkeys(layers, FP16), SCHEME, _inputs(1))
    inputs, labels = stack(digits_splits.test)
    result = compare_logits(run_onnx(fp32, inputs), run_onnx(out, inputs), labels,
                            Tolerances().fp16)  # fmt: skip
    assert result.passed, result.to_dict()
    assert result.max_abs_error > 0  # it really ran in float16


class _Overflowing(nn.Module):
    """FP16-hostile ops between layers: an unfolded BatchNorm, LayerNorm, Pow, Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)  # after a ReLU: the exporter cannot fold it
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm(torch.relu(self.conv1(x))))  # (B, 8, 32, 32)
        h = torch.softmax(h, dim=1).pow(2).mean(dim=(2, 3))  # (B, 8)
        return self.fc(self.ln(h))


def test_overflowing_ops_stay_fp32_inside_fp16_layers_and_are_listed(tmp_path):
    torch.manual_seed(0)
    model = _Overflowing().eval()
    with torch.no_grad():  # non-trivial running statistics
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    fp32 = export_onnx(model, SHAPE, tmp_path / "fp32.onnx")
    layers = policy_layers(model)
    out = tmp_path / "fp16.onnx"
    report = quantize_onnx(fp32, out, dict.fromkeys(layers, FP16), SCHEME, _inputs(1))
    assert layer_precisions(out, layers) == dict.fromkeys(layers, FP16)
    proto = onnx.load(str(out))
    ops = {n.name: n.op_type for n in proto.graph.node}
    kept = report["kept_fp32_nodes"]
    assert {ops[name] for name in kept} >= {
        "BatchNormalization", "Softmax", "Pow", "ReduceMean", "LayerNormalization",
    }  # fmt: skip
    assert all(ops[name] in FP32_ONLY_OPS for name in kept)
    types = _elem_types(_with_shapes(proto))
    for node in proto.graph.node:
        if node.name in kept:
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
            assert types[node.output[0]] == TensorProto.FLOAT, node.name
    inputs = _inputs(4)
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(run_onnx(out, inputs), expected, atol=5e-2)


def test_weights_beyond_the_fp16_range_are_clipped_not_infinite():
    weight = numpy_helper.from_array(np.full((2, 3, 1, 1), 1e6, np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="/conv/Conv")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    done = convert_to_fp16(model, ["/conv/Conv"])
    assert done.fp16_nodes == ["/conv/Conv"]
    (half,) = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert np.isfinite(numpy_helper.to_array(half)).all()
    onnx.checker.check_model(model, full_check=True)


def test_unknown_nodes_are_refused():
    model = helper.make_model(
        helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 17)]
    )
    with pytest.raises(ValueError, match="no node named"):
        convert_to_fp16(model, ["/missing/Conv"])
