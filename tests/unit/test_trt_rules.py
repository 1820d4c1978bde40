"""TensorRT's explicit-quantization rules, checked on CPU: the graphs written for the TensorRT
profiles pass, and a graph that breaks each rule is caught with a message naming the node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TEST_INPUT, make_tiny_resnet
from onnx import numpy_helper

from exporters import export_onnx, quantize_onnx
from exporters.trt_rules import check_trt_qdq
from pipeline.core.policy import Precision, policy_layers
from pipeline.core.profile import load_profile


def _int8_graph(tmp_path: Path, profile: str, name: str = "q.onnx") -> onnx.ModelProto:
    model = make_tiny_resnet().eval()
    fp32 = export_onnx(model, TEST_INPUT, tmp_path / f"{name}.fp32.onnx")
    precisions = dict.fromkeys(policy_layers(model), Precision.INT8)
    calib = np.random.default_rng(0).random((8, *TEST_INPUT), dtype=np.float32)
    quantize_onnx(fp32, tmp_path / name, precisions, load_profile(profile).int8, calib)
    return onnx.load(str(tmp_path / name))


@pytest.fixture(scope="module")
def trt_graph(tmp_path_factory) -> onnx.ModelProto:
    return _int8_graph(tmp_path_factory.mktemp("trt"), "gpu-trt")


@pytest.mark.parametrize("profile", ["gpu-trt", "jetson"])
def test_the_graphs_written_for_tensorrt_profiles_pass(tmp_path, profile) -> None:
    graph = _int8_graph(tmp_path, profile)
    assert any(n.op_type == "DequantizeLinear" for n in graph.graph.node)  # it is quantized
    assert check_trt_qdq(tmp_path / "q.onnx") == []


def test_the_cpu_scheme_breaks_them_as_tensorrt_would_say(tmp_path) -> None:
    problems = check_trt_qdq(_int8_graph(tmp_path, "cpu"))
    assert any("uint8 zero point" in p for p in problems)  # U8S8: asymmetric activations
    assert any("int32 input" in p for p in problems)  # biases quantized to int32


def _copy(graph: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(graph)
    return copied


def _first(graph: onnx.ModelProto, op: str, weight: bool) -> onnx.NodeProto:
    names = {t.name for t in graph.graph.initializer}
    return next(n for n in graph.graph.node if n.op_type == op and (n.input[0] in names) == weight)


def _initializer(graph: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in graph.graph.initializer if t.name == name)


def _set(graph: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    _initializer(graph, name).CopyFrom(numpy_helper.from_array(value, name))


def test_an_old_opset_is_caught(trt_graph) -> None:
    graph = _copy(trt_graph)
    graph.opset_import[0].version = 11
    assert any("opset 11" in p for p in check_trt_qdq(graph))


def test_operator_form_int8_is_caught(trt_graph) -> None:
    graph = _copy(trt_graph)
    _first(graph, "Conv", weight=False).op_type = "QLinearConv"
    assert any("QLinearConv" in p and "does not parse" in p for p in check_trt_qdq(graph))


def test_a_nonzero_or_missing_zero_point_is_caught(trt_graph) -> None:
    graph = _copy(trt_graph)
    q = _first(graph, "QuantizeLinear", weight=False)
    _set(graph, q.input[2], np.array(3, dtype=np.int8))
    assert any("zero point 3" in p for p in check_trt_qdq(graph))
    del q.input[2]
    assert any("no zero point" in p for p in check_trt_qdq(graph))


def test_per_tensor_weights_and_a_wrong_axis_are_caught(trt_graph) -> None:
    graph = _copy(trt_graph)
    dq = _first(graph, "DequantizeLinear", weight=True)
    scale = numpy_helper.to_array(_initializer(graph, dq.input[1]))
    axis = next(a for a in dq.attribute if a.name == "axis") if dq.attribute else None
    if axis is not None:
        axis.i = 1
    else:
        dq.attribute.append(onnx.helper.make_attribute("axis", 1))
    assert any("output channels are 0" in p for p in check_trt_qdq(graph))
    _set(graph, dq.input[1], np.array(scale.max(), dtype=scale.dtype))
    _set(graph, dq.input[2], np.array(0, dtype=np.int8))
    assert any("one weight scale" in p for p in check_trt_qdq(graph))


def test_a_per_channel_activation_scale_is_caught(trt_graph) -> None:
    graph = _copy(trt_graph)
    q = _first(graph, "QuantizeLinear", weight=False)
    scale = numpy_helper.to_array(_initializer(graph, q.input[1]))
    _set(graph, q.input[1], np.full(3, scale, dtype=scale.dtype))
    assert any("one scale (per tensor)" in p for p in check_trt_qdq(graph))


def test_quantized_weights_over_float_data_are_caught(trt_graph) -> None:
    graph = _copy(trt_graph)
    producers = {o: n for n in graph.graph.node for o in n.output}
    conv = next(
        n
        for n in graph.graph.node
        if n.op_type == "Conv" and producers.get(n.input[0], n).op_type == "DequantizeLinear"
    )
    q = producers[producers[conv.input[0]].input[0]]  # DQ <- Q <- the float activation
    conv.input[0] = q.input[0]
    assert any("quantized weights but float data" in p for p in check_trt_qdq(graph))


def test_the_trtexec_commands_mirror_the_builder(tmp_path) -> None:
    from exporters.trtexec import trtexec_commands

    model = make_tiny_resnet().eval()
    graph = export_onnx(model, TEST_INPUT, tmp_path / "model.onnx")  # a dynamic batch axis
    gpu = load_profile("gpu-trt").model_copy()
    profile = gpu.model_copy(update={"input": gpu.input.model_copy(update={"shape": TEST_INPUT})})
    commands = trtexec_commands(graph, profile)
    build = commands["build"].split()
    assert build[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine"]
    assert {"--stronglyTyped", "--noTF32", "--timingCacheFile=timing.cache"} <= set(build)
    batch = profile.input.batch
    assert "--minShapes=input:1x3x32x32" in build and f"--maxShapes=input:{batch}x3x32x32" in build
    bench = commands["bench"].split()
    assert f"--shapes=input:{batch}x3x32x32" in bench
    assert f"--iterations={profile.measure.repeats}" in bench
