"""Quantization-aware recovery: real training on digits, real ONNX Runtime INT8 graphs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from exporters import export_onnx, layer_precisions, quantize_onnx, run_onnx
from pipeline.core.config import RunConfig
from pipeline.core.errors import ConfigError
from pipeline.core.policy import LayerAction, Policy, Precision, policy_layers
from pipeline.core.profile import Int8Scheme, TargetProfile
from pipeline.core.schema import parse_model
from pipeline.core.train_spec import TrainSpec
from pipeline.model.data import load_data
from pipeline.model.evaluate import accuracy, stack, torch_logits
from pipeline.model.fake_quant import (
    attach_fake_quant,
    detach_fake_quant,
    fake_quant_weight,
    folded_norms,
)
from pipeline.model.finetune import train
from pipeline.run.validate import QAT_SCALES, source_logits
from pipeline.search.int8_recovery import recover_int8

SHAPE = (1, 16, 16)
QAT = TrainSpec(steps=60, lr=3e-4, batch_size=64, kd_weight=1.0)
INT8, FP16 = Precision.INT8, Precision.FP16


class SmallNet(nn.Module):
    """Three conv + BatchNorm + ReLU stages and a linear head: trains on digits in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, 16, 16, 16)
        x = torch.relu(self.bn2(self.conv2(x)))  # (B, 32, 8, 8)
        x = torch.relu(self.bn3(self.conv3(x)))  # (B, 32, 4, 4)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def one_thread():
    # Two OpenMP threads on a busy two-core machine run these tiny layers ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits():
    return load_data("digits", SHAPE, seed=0)


@pytest.fixture(scope="module")
def trained_state(splits, one_thread) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallNet()
    spec = TrainSpec(steps=150, lr=0.05, batch_size=64, schedule="onecycle", seed=0)
    train(model, splits.train, spec, show_progress=False)
    return model.state_dict()


def _model(state: dict[str, torch.Tensor]) -> SmallNet:
    model = SmallNet()
    model.load_state_dict(state)
    return model.eval()


def with_outlier(model: SmallNet, alpha: float = 100.0) -> SmallNet:
    """The same function with one channel of conv1's folded weight `alpha` times larger.

    bn1's channel 0 is scaled by alpha and conv2 reads that channel divided by alpha (ReLU is
    positively homogeneous): a per-tensor INT8 step is then set by that one channel.
    """
    with torch.no_grad():
        model.bn1.weight[0] *= alpha
        model.bn1.bias[0] *= alpha
        model.conv2.weight[:, 0] /= alpha
    return model


def _profile(per_channel: bool, max_drop: float = 0.02) -> TargetProfile:
    return TargetProfile.model_validate(
        {
            "name": "small",
            "runtime": "onnxruntime-cpu",
            "input": {"shape": list(SHAPE)},
            "max_accuracy_drop": max_drop,
            "int8": {"per_channel": per_channel, "calib_samples": 64},
        }
    )


def _all(model: nn.Module, precision: Precision) -> Policy:
    return Policy({n: LayerAction(1.0, precision) for n in policy_layers(model)})


def test_the_outlier_keeps_the_function(trained_state, splits):
    inputs, _ = stack(splits.val)
    model = _model(trained_state)
    np.testing.assert_allclose(
        torch_logits(with_outlier(copy.deepcopy(model)), inputs),
        torch_logits(model, inputs),
        atol=1e-4,
    )


def _q_scales(path: Path) -> dict[str, float]:
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    # ORT renames a quantized graph output's float tensor `<name>_QuantizeLinear_Input`.
    return {
        n.input[0].removesuffix("_QuantizeLinear_Input"): float(inits[n.input[1]])
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and inits[n.input[1]].size == 1
    }


def test_qat_recovers_what_post_training_int8_loses(trained_state, splits, tmp_path, one_thread):
    model = with_outlier(_model(trained_state))
    before = copy.deepcopy(model.state_dict())
    policy = _all(model, INT8)
    out, fp32 = tmp_path / "model.onnx", tmp_path / "fp32.onnx"
    profile = _profile(per_channel=False)
    result = recover_int8(
        model, model, policy, profile, splits, out, mode="auto", spec=QAT, fp32_path=fp32
    )
    info = result.info
    assert info["ptq_drop"] > profile.max_accuracy_drop, "PTQ must lose accuracy here"
    assert info["method"] == "qat"
    assert info["qat_accuracy"] > info["ptq_accuracy"] + 0.05, info
    assert set(result.model.state_dict()) == set(before)  # same architecture
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"the input model changed: {key}"

    layers = policy_layers(model)
    assert layer_precisions(out, layers) == dict.fromkeys(layers, INT8)
    inputs, labels = stack(splits.val)
    deployed = run_onnx(out, inputs)
    assert accuracy(deployed, labels) == pytest.approx(info["qat_accuracy"])
    # Validation's reference for a QAT graph: the model fake-quantized with the learned steps
    # (read back from the run directory's JSON), which the graph follows within the INT8
    # tolerance validation applies (rounding ties split a few samples either way).
    (tmp_path / QAT_SCALES).write_text(json.dumps(result.qparams))
    reference = source_logits(result.model, inputs, tmp_path, profile.int8)
    agreement = (reference.argmax(1) == deployed.argmax(1)).mean()
    assert agreement >= profile.tolerances.int8.min_top1_agreement
    # The written graph carries the learned steps, not the ones calibration gives its weights.
    calibrated = tmp_path / "calibrated.onnx"
    calib = stack(splits.calib)[0]
    quantize_onnx(fp32, calibrated, policy.precisions(), profile.int8, calib)
    learned, steps = _q_scales(out), _q_scales(calibrated)
    assert set(info["learned_scales"]) <= set(learned)
    assert any(learned[t] != pytest.approx(steps[t]) for t in info["learned_scales"])
    # Held-out test split: the gain over PTQ is not an artefact of choosing on val.
    ptq = tmp_path / "ptq.onnx"
    quantize_onnx(export_onnx(model, SHAPE, tmp_path / "original.onnx"), ptq,
                  policy.precisions(), profile.int8, calib)  # fmt: skip
    test_in, test_labels = stack(splits.test)
    assert accuracy(run_onnx(out, test_in), test_labels) > accuracy(
        run_onnx(ptq, test_in), test_labels
    )


def test_the_exported_graph_runs_as_the_fake_quantized_model(trained_state, splits, tmp_path):
    """Fake quantization in torch and the Q/DQ graph with the same steps agree."""
    model = with_outlier(_model(trained_state))
    layers = policy_layers(model)
    scheme = Int8Scheme(per_channel=False, calib_samples=64)
    fp32 = export_onnx(model, SHAPE, tmp_path / "fp32.onnx")
    calib = stack(splits.calib)[0][:64]
    quantizers = attach_fake_quant(model, layers, scheme, calib)
    overrides = {f: {s: quantizers[(f, s)].qparams() for s in ("input", "output")} for f in layers}
    graph = tmp_path / "int8.onnx"
    quantize_onnx(fp32, graph, dict.fromkeys(layers, INT8), scheme, calib,
                  activation_overrides=overrides)  # fmt: skip
    inputs, _ = stack(splits.val)
    fake, real = torch_logits(model, inputs), run_onnx(graph, inputs)
    assert (fake.argmax(1) == real.argmax(1)).mean() >= 0.99
    detach_fake_quant(model, layers)
    assert all("forward" not in m.__dict__ for m in model.modules())
    float_logits = torch_logits(model, inputs)
    assert np.abs(float_logits - real).max() > np.abs(fake - real).max()


def test_auto_keeps_ptq_when_it_loses_little(trained_state, splits, tmp_path):
    model = _model(trained_state)
    result = recover_int8(model, None, _all(model, INT8), _profile(per_channel=True, max_drop=0.2),
                          splits, tmp_path / "m.onnx", spec=QAT)  # fmt: skip
    assert result.info["method"] == "ptq" and result.info["qat_accuracy"] is None
    assert result.model is model


def test_never_does_no_qat(trained_state, splits, tmp_path):
    model = with_outlier(_model(trained_state))
    result = recover_int8(model, None, _all(model, INT8), _profile(per_channel=False), splits,
                          tmp_path / "m.onnx", mode="never", spec=QAT)  # fmt: skip
    assert result.info["method"] == "ptq" and result.info["ptq_drop"] > 0.02
    assert result.info["qat_steps"] == 0


def test_always_with_fp16_layers_and_no_int8(trained_state, splits, tmp_path, one_thread):
    model = _model(trained_state)
    layers = policy_layers(model)
    mixed = Policy({n: LayerAction(1.0, FP16 if n == "conv1" else INT8) for n in layers})
    out = tmp_path / "mixed.onnx"
    short = TrainSpec(steps=5, lr=1e-4, batch_size=32)
    result = recover_int8(model, model, mixed, _profile(True), splits, out, mode="always",
                          spec=short)  # fmt: skip
    assert result.info["method"] == "qat"
    assert layer_precisions(out, layers) == mixed.precisions()
    assert result.quantization["fp16_layers"] == ["conv1"]
    none = recover_int8(model, None, _all(model, FP16), _profile(True), splits,
                        tmp_path / "fp16.onnx", mode="always")  # fmt: skip
    assert none.info == {"method": "none", "mode": "always"}
    assert layer_precisions(tmp_path / "fp16.onnx", layers) == dict.fromkeys(layers, FP16)


def test_folded_norms_are_the_pairs_the_exporter_folds(tiny_resnet):
    pairs = folded_norms(tiny_resnet)
    assert pairs["conv1"] is tiny_resnet.bn1
    assert pairs["layer2.0.downsample.0"] is tiny_resnet.layer2[0].downsample[1]
    assert "fc" not in pairs


def test_weight_fake_quantization_matches_the_folded_int8_weight():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3)
    fold = torch.tensor([0.5, 2.0, -1.0, 10.0])
    quantized = fake_quant_weight(weight, fold, per_channel=True) * fold.view(-1, 1, 1, 1)
    folded = weight * fold.view(-1, 1, 1, 1)
    steps = folded.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    np.testing.assert_allclose(quantized, torch.round(folded / steps) * steps, atol=1e-6)


def test_qat_mode_is_validated_in_the_run_config():
    assert RunConfig().finetune.qat == "auto"
    assert RunConfig.model_validate({"finetune": {"qat": "always"}}).finetune.qat == "always"
    with pytest.raises(ConfigError, match=r"finetune\.qat"):
        parse_model(RunConfig, {"finetune": {"qat": "sometimes"}}, "pipeline.yaml")
