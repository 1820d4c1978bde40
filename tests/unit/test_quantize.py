"""Per-layer INT8 with ONNX Runtime static quantization: the graph must match the policy exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
import yaml
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exporters import compare_logits, export_onnx, layer_precisions, quantize_onnx, run_onnx
from exporters.onnx_export import layer_node_map
from pipeline.core.errors import ConfigError, DataError, ModelError, PolicyError
from pipeline.core.policy import Precision, policy_layers
from pipeline.core.profile import Int8Scheme, TargetProfile, Tolerance, load_profile
from pipeline.model.evaluate import stack

SHAPE = (3, 32, 32)
INT8, FP32 = Precision.INT8, Precision.FP32
QDQ_U8S8 = Int8Scheme(calib_samples=16)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10).eval()
    return torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[list[str], Path]]:
    """resnet18 and mobilenet_v2 exported once: name -> (policy layers, fp32 path)."""
    folder = tmp_path_factory.mktemp("fp32")
    out = {}
    for name in ("resnet18", "mobilenet_v2"):
        model = _build(name)
        out[name] = (policy_layers(model), export_onnx(model, SHAPE, folder / f"{name}.onnx"))
    return out


def _calib(n: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def _policy(layers: list[str], kind: str) -> dict[str, Precision]:
    if kind == "all-int8":
        return dict.fromkeys(layers, INT8)
    if kind == "all-fp32":
        return dict.fromkeys(layers, FP32)
    return {name: INT8 if i % 2 == 0 else FP32 for i, name in enumerate(layers)}  # mixed


def _assert_fp32_layers_are_clean(path: Path, precisions: dict[str, Precision]) -> None:
    """FP32 layers read float weights and biases, and no activation rounded by a Q -> DQ pair."""
    proto = onnx.load(str(path))
    nodes = {n.name: n for n in proto.graph.node}
    producers = {out: n for n in proto.graph.node for out in n.output}
    fp32 = [name for name, p in precisions.items() if p == FP32]
    for fqn, node_name in layer_node_map(proto, fp32).items():
        node = nodes[node_name]
        # Weight and bias: an initializer, or an Identity of one (the exporter's dedup).
        sources = [producers.get(name) for name in node.input[1:]]
        assert all(s is None or s.op_type == "Identity" for s in sources), fqn
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "DequantizeLinear":
            upstream = producers.get(source.input[0])
            assert upstream is None or upstream.op_type != "QuantizeLinear", fqn


def _data_source_ops(path: Path, layers: list[str]) -> dict[str, str | None]:
    """{layer -> op type of the node producing its data input (None: a graph input)}."""
    proto = onnx.load(str(path))
    nodes = {n.name: n for n in proto.graph.node}
    producers = {out: n.op_type for n in proto.graph.node for out in n.output}
    return {
        fqn: producers.get(nodes[name].input[0])
        for fqn, name in layer_node_map(proto, layers).items()
    }


def _relu_count(path: Path, op: str = "Relu") -> int:
    return sum(n.op_type == op for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("kind", ["all-int8", "mixed", "all-fp32"])
@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v2"])
def test_graph_matches_the_policy_exactly(exports, tmp_path, model_name, kind):
    layers, fp32_path = exports[model_name]
    precisions = _policy(layers, kind)
    out = tmp_path / "model.onnx"
    report = quantize_onnx(fp32_path, out, precisions, QDQ_U8S8, _calib())
    onnx.checker.check_model(str(out), full_check=True)
    assert layer_precisions(out, layers) == precisions
    _assert_fp32_layers_are_clean(out, precisions)
    # a float layer reads its input from the same kind of node as in the FP32 graph: a Relu
    # before it is never folded into its INT8 neighbour's quantization
    fp32 = [name for name in layers if precisions[name] == FP32]
    before = _data_source_ops(fp32_path, fp32)
    assert _data_source_ops(out, fp32) == before
    assert report["int8_layers"] == [n for n in layers if precisions[n] == INT8]
    assert report["fp32_layers"] == [n for n in layers if precisions[n] == FP32]
    assert report["scheme"] == QDQ_U8S8.model_dump()
    assert report["calib_samples"] == (0 if kind == "all-fp32" else 16)
    assert run_onnx(out, _calib(3, seed=1)).shape == (3, 10)
    assert not list(tmp_path.glob(".*.tmp"))


def test_relus_after_int8_layers_fold_into_their_quantization(exports, tmp_path):
    """U8 activations: each Conv -> Relu of INT8 layers is quantized once, so no DQ -> Q pair
    is left between them, and the outputs still agree with the float graph."""
    layers, fp32_path = exports["resnet18"]
    calib, data = _calib(), _calib(8, seed=1)
    out = tmp_path / "u8.onnx"
    quantize_onnx(fp32_path, out, dict.fromkeys(layers, INT8), QDQ_U8S8, calib)
    # ResNet-18: a Relu after the stem and after each block's first conv (9) folds; the 8
    # after the residual Adds (not layers, so not quantized here) stay
    assert (_relu_count(fp32_path), _relu_count(out)) == (17, 8)
    reference = tmp_path / "unfolded.onnx"  # signed activations: nothing folds
    signed = Int8Scheme(activation_type="int8", weight_type="int8", calib_samples=16)
    quantize_onnx(fp32_path, reference, dict.fromkeys(layers, INT8), signed, calib)
    assert _relu_count(reference) == 17
    float_top = run_onnx(fp32_path, data).argmax(1)
    assert (run_onnx(out, data).argmax(1) == float_top).mean() >= 0.75


def test_relu6_after_int8_layers_folds_too(exports, tmp_path):
    """MobileNetV2's ReLU6 (a Clip from 0 to 6) after each of its INT8 convolutions folds."""
    layers, fp32_path = exports["mobilenet_v2"]
    out = tmp_path / "u8.onnx"
    quantize_onnx(fp32_path, out, dict.fromkeys(layers, INT8), QDQ_U8S8, _calib())
    assert _relu_count(fp32_path, "Clip") == 35 and _relu_count(out, "Clip") == 0
    assert layer_precisions(out, layers) == dict.fromkeys(layers, INT8)


def test_all_fp32_policy_copies_the_file(exports, tmp_path):
    layers, fp32_path = exports["mobilenet_v2"]
    out = tmp_path / "copy.onnx"
    quantize_onnx(fp32_path, out, _policy(layers, "all-fp32"), QDQ_U8S8, _calib())
    assert out.read_bytes() == fp32_path.read_bytes()


def test_layers_missing_from_the_policy_stay_fp32(exports, tmp_path):
    layers, fp32_path = exports["resnet18"]
    out = tmp_path / "model.onnx"
    quantize_onnx(fp32_path, out, {"layer3.0.conv2": INT8}, QDQ_U8S8, _calib())
    actual = layer_precisions(out, layers)
    assert {name for name, p in actual.items() if p == INT8} == {"layer3.0.conv2"}


def _zero_points(path: Path) -> list[np.ndarray]:
    """Zero points of the activation QuantizeLinear nodes."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]


def test_s8s8_qdq_uses_symmetric_signed_activations(exports, tmp_path):
    layers, fp32_path = exports["resnet18"]
    scheme = Int8Scheme(activation_type="int8", weight_type="int8", calib_samples=8)
    precisions = _policy(layers, "mixed")
    out = tmp_path / "s8s8.onnx"
    quantize_onnx(fp32_path, out, precisions, scheme, _calib())
    onnx.checker.check_model(str(out), full_check=True)
    assert layer_precisions(out, layers) == precisions
    zero_points = _zero_points(out)
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert run_onnx(out, _calib(2)).shape == (2, 10)


def test_qoperator_writes_qlinear_ops(exports, tmp_path):
    layers, fp32_path = exports["resnet18"]
    precisions = _policy(layers, "mixed")
    out = tmp_path / "qop.onnx"
    quantize_onnx(fp32_path, out, precisions, Int8Scheme(format="qoperator"), _calib())
    onnx.checker.check_model(str(out), full_check=True)
    ops = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    # ORT renames a quantized node `<name>_quant`; the module scope survives in the name.
    assert ops["/layer1/layer1.0/conv2/Conv_quant"] == "QLinearConv"
    assert ops["/fc/Gemm_quant"] == "QGemm"
    assert ops["/layer1/layer1.0/conv1/Conv"] == "Conv"
    assert layer_precisions(out, layers) == precisions
    _assert_fp32_layers_are_clean(out, precisions)
    assert run_onnx(out, _calib(2)).shape == (2, 10)


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_every_calibration_with_an_uneven_sample_count(exports, tmp_path, calibration):
    layers, fp32_path = exports["mobilenet_v2"]
    precisions = _policy(layers, "all-int8")
    scheme = Int8Scheme(calibration=calibration, calib_samples=11)  # 11: no batch of 8 fits
    out = tmp_path / f"{calibration}.onnx"
    report = quantize_onnx(fp32_path, out, precisions, scheme, _calib(20))
    assert report["calib_samples"] == 11
    assert report["scheme"]["calibration"] == calibration
    onnx.checker.check_model(str(out), full_check=True)
    assert layer_precisions(out, layers) == precisions
    assert np.isfinite(run_onnx(out, _calib(2))).all()


def test_int8_agrees_with_fp32_on_real_data(trained_tiny_resnet, digits_splits, tmp_path):
    model = trained_tiny_resnet
    layers = policy_layers(model)
    fp32 = export_onnx(model, SHAPE, tmp_path / "fp32.onnx")
    calib, _ = stack(digits_splits.calib)
    inputs, labels = stack(digits_splits.test)
    int8 = tmp_path / "int8.onnx"
    quantize_onnx(fp32, int8, _policy(layers, "all-int8"), Int8Scheme(calib_samples=128), calib)
    reference = run_onnx(fp32, inputs, threads=2)
    assert len(np.unique(reference.argmax(axis=1))) >= 8, "a trivial model proves nothing"
    tolerance = Tolerance(atol=1.5, rtol=0.5, min_top1_agreement=0.95)
    result = compare_logits(reference, run_onnx(int8, inputs, threads=2), labels, tolerance)
    assert result.top1_agreement >= 0.95, result.to_dict()
    assert result.candidate_accuracy >= result.reference_accuracy - 0.05


def test_fp16_layers_are_written_alongside_int8(exports, tmp_path):
    layers, fp32_path = exports["mobilenet_v2"]
    precisions = {**_policy(layers, "mixed"), layers[3]: Precision.FP16}
    out = tmp_path / "m.onnx"
    report = quantize_onnx(fp32_path, out, precisions, QDQ_U8S8, _calib())
    assert layer_precisions(out, layers) == precisions
    assert report["fp16_layers"] == [layers[3]]
    assert run_onnx(out, _calib(2)).shape == (2, 10)


def _activation_qparams(path: Path, tensor: str) -> tuple[float, int]:
    """Scale and zero point of the QuantizeLinear reading `tensor` (ORT renames a graph
    output's float tensor `<name>_QuantizeLinear_Input`)."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    names = {tensor, f"{tensor}_QuantizeLinear_Input"}
    (q,) = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in names]
    return float(inits[q.input[1]]), int(inits[q.input[2]])


@pytest.mark.parametrize(
    ("fmt", "activation"), [("qdq", "uint8"), ("qdq", "int8"), ("qoperator", "uint8")]
)
def test_activation_overrides_impose_the_given_scales(exports, tmp_path, fmt, activation):
    layers, fp32_path = exports["resnet18"]
    precisions = _policy(layers, "all-int8")
    scheme = Int8Scheme(format=fmt, activation_type=activation, calib_samples=4)
    zp = 3 if activation == "uint8" else 0
    # layer1.0.conv1's input is the block's input, which downsample-free block 1 adds back;
    # fc's output is the graph output `logits`.
    given = {
        "layer1.0.conv1": {"input": (0.0123, zp), "output": (0.0321, zp)},
        "fc": {"input": (0.0456, zp), "output": (0.0654, zp)},
    }
    out = tmp_path / "override.onnx"
    report = quantize_onnx(fp32_path, out, precisions, scheme, _calib(),
                           activation_overrides=given)  # fmt: skip
    raw = onnx.load(str(fp32_path))
    nodes = {n.name: n for n in raw.graph.node}
    mapping = layer_node_map(raw, list(given))
    for fqn, sides in given.items():
        node = nodes[mapping[fqn]]
        for side, (scale, zero_point) in sides.items():
            tensor = node.input[0] if side == "input" else node.output[0]
            assert tensor in report["activation_overrides"]
            if side == "output" and fmt == "qoperator":
                continue  # a QLinear op's own output parameters, no QuantizeLinear to read
            got_scale, got_zp = _activation_qparams(out, tensor)
            assert got_scale == pytest.approx(scale) and got_zp == zero_point, (fqn, side)
    assert layer_precisions(out, layers) == precisions
    assert np.isfinite(run_onnx(out, _calib(2))).all()


def test_activation_overrides_for_a_non_int8_layer_are_a_policy_error(exports, tmp_path):
    layers, fp32_path = exports["resnet18"]
    precisions = {**_policy(layers, "all-fp32"), "fc": INT8}
    with pytest.raises(PolicyError, match="conv1"):
        quantize_onnx(fp32_path, tmp_path / "m.onnx", precisions, QDQ_U8S8, _calib(),
                      activation_overrides={"conv1": {"input": (0.1, 0)}})  # fmt: skip


def test_calib_samples_argument_overrides_the_scheme(exports, tmp_path):
    layers, fp32_path = exports["mobilenet_v2"]
    report = quantize_onnx(fp32_path, tmp_path / "m.onnx", _policy(layers, "mixed"), QDQ_U8S8,
                           _calib(16), calib_samples=5)  # fmt: skip
    assert report["calib_samples"] == 5


@pytest.mark.parametrize("precision", [INT8, FP32])
def test_unknown_layers_are_a_policy_error(exports, tmp_path, precision):
    _, fp32_path = exports["mobilenet_v2"]
    with pytest.raises(PolicyError, match=r"features\.99"):
        quantize_onnx(
            fp32_path, tmp_path / "m.onnx", {"features.99": precision}, QDQ_U8S8, _calib()
        )


def test_no_calibration_data_is_a_data_error(exports, tmp_path):
    layers, fp32_path = exports["mobilenet_v2"]
    empty = np.zeros((0, *SHAPE), np.float32)
    with pytest.raises(DataError, match="calibration"):
        quantize_onnx(fp32_path, tmp_path / "m.onnx", _policy(layers, "mixed"), QDQ_U8S8, empty)


def test_a_static_batch_graph_is_calibrated_in_full_batches(exports, tmp_path):
    layers, fp32_path = exports["mobilenet_v2"]
    proto = onnx.load(str(fp32_path))
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 4  # replaces the `batch` parameter
    static = tmp_path / "static.onnx"
    onnx.save(proto, str(static))
    out = tmp_path / "int8.onnx"
    quantize_onnx(static, out, _policy(layers, "all-int8"), QDQ_U8S8, _calib(10))
    assert layer_precisions(out, layers) == _policy(layers, "all-int8")
    assert run_onnx(out, _calib(6)).shape == (6, 10)  # padded to 8, padding dropped


def _tiny_graph(weight_type: int) -> onnx.ModelProto:
    """One Conv named as the exporter would name module `conv`, with a typed weight."""
    dtype = helper.tensor_dtype_to_np_dtype(weight_type)
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), dtype), "onnx::Conv_1")
    node = helper.make_node("Conv", ["input", "onnx::Conv_1"], ["logits"], name="/conv/Conv")
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("input", weight_type, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("logits", weight_type, [1, 4, 2, 2])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_layer_precisions_reads_float16_layers():
    assert layer_precisions(_tiny_graph(TensorProto.FLOAT16), ["conv"]) == {"conv": Precision.FP16}
    assert layer_precisions(_tiny_graph(TensorProto.FLOAT), ["conv"]) == {"conv": FP32}
    session = ort.InferenceSession(
        _tiny_graph(TensorProto.FLOAT16).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert session.get_inputs()[0].type == "tensor(float16)"


class _Tokens(nn.Module):
    """A Linear on a 3-D tensor (exported as MatMul + Add) between a Conv and a Gemm head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, 64, 8)
        return self.head(self.proj(tokens).mean(dim=1))  # (B, 10)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_matmul_layers_quantize_too(tmp_path, fmt):
    torch.manual_seed(0)
    fp32 = export_onnx(_Tokens().eval(), SHAPE, tmp_path / "tokens.onnx")
    precisions = {"stem": FP32, "proj": INT8, "head": FP32}
    out = tmp_path / "int8.onnx"
    quantize_onnx(fp32, out, precisions, Int8Scheme(format=fmt), _calib())
    assert layer_precisions(out, list(precisions)) == precisions
    _assert_fp32_layers_are_clean(out, precisions)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("QLinearMatMul" in ops) is (fmt == "qoperator")


@pytest.mark.parametrize("runtime", ["tensorrt", "onnxruntime-cuda"])
@pytest.mark.parametrize(
    "int8",
    [{"format": "qoperator"}, {"activation_type": "uint8"}, {"weight_type": "uint8"}],
)
def test_tensorrt_profiles_refuse_schemes_other_than_s8s8_qdq(tmp_path, runtime, int8):
    body = {"name": "gpu", "runtime": runtime, "int8": int8}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match="S8S8 Q/DQ") as info:
        load_profile(path)
    assert "\n" not in str(info.value)


def test_tensorrt_profiles_default_to_s8s8_qdq_which_exports_and_runs(exports, tmp_path):
    profile = TargetProfile.model_validate({"name": "gpu", "runtime": "tensorrt"})
    assert (profile.int8.format, profile.int8.activation_type, profile.int8.weight_type) == (
        "qdq", "int8", "int8",
    )  # fmt: skip
    cpu = TargetProfile.model_validate({"name": "cpu", "runtime": "onnxruntime-cpu"})
    assert cpu.int8.activation_type == "uint8"  # the fast x86 scheme stays the CPU default
    layers, fp32_path = exports["resnet18"]
    out = tmp_path / "trt.onnx"
    quantize_onnx(fp32_path, out, _policy(layers, "mixed"), profile.int8, _calib())
    zero_points = _zero_points(out)
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert run_onnx(out, _calib(2)).shape == (2, 10)


def test_a_model_that_outputs_nan_is_a_model_error_naming_the_cause(tmp_path):
    # A fine-tune that diverged to NaN weights, which ONNX Runtime's calibrator reports only as
    # "scale issue"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).eval()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    fp32_path = export_onnx(model, SHAPE, tmp_path / "fp32.onnx")
    precisions = dict.fromkeys(policy_layers(model), INT8)
    with pytest.raises(ModelError, match="NaN or inf on the calibration images") as info:
        quantize_onnx(fp32_path, tmp_path / "m.onnx", precisions, QDQ_U8S8, _calib())
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.onnx").exists()
