"""One graph, three precisions: INT8 Q/DQ, FP16 and FP32 layers as a policy says, validated."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from exporters import export_onnx, layer_precisions, quantize_onnx, run_onnx
from pipeline.core.policy import Precision, policy_layers
from pipeline.core.profile import TargetProfile, load_profile
from pipeline.model.demo import DEMO_ARCH, DEMO_INPUT
from pipeline.model.evaluate import stack, torch_logits
from pipeline.model.models import build_model
from pipeline.run.validate import compare_deployed

INT8, FP16, FP32 = Precision.INT8, Precision.FP16, Precision.FP32
CYCLE = (INT8, FP16, FP32)


def _mixed(layers: list[str]) -> dict[str, Precision]:
    return {name: CYCLE[i % 3] for i, name in enumerate(layers)}


@pytest.mark.parametrize("profile_name", ["cpu", "gpu-trt"])
def test_the_demo_architecture_runs_a_mixed_policy_as_written(tmp_path, profile_name):
    """resnet18 at the demo's 48x48 (untrained: the precision check needs no accuracy)."""
    profile = load_profile(profile_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(DEMO_ARCH, 10).eval()
    layers = policy_layers(model)
    precisions = _mixed(layers)
    fp32 = export_onnx(model, DEMO_INPUT, tmp_path / "fp32.onnx")
    inputs = np.random.default_rng(0).standard_normal((16, *DEMO_INPUT)).astype(np.float32)
    out = tmp_path / "mixed.onnx"
    report = quantize_onnx(fp32, out, precisions, profile.int8, inputs)
    onnx.checker.check_model(str(out), full_check=True)
    assert layer_precisions(out, layers) == precisions
    for p in CYCLE:
        assert report[f"{p.value}_layers"] == [n for n in layers if precisions[n] == p]
    graph = onnx.load(str(out)).graph
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [
        TensorProto.FLOAT,
        TensorProto.FLOAT,
    ]
    logits = run_onnx(out, inputs[:4])
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


@pytest.fixture
def cpu_profile(tiny_profile) -> TargetProfile:
    """The shipped CPU profile's INT8 scheme and tolerances at the tests' 32x32 input."""
    cpu = load_profile("cpu")
    return tiny_profile.model_copy(
        update={"int8": cpu.int8, "tolerances": cpu.tolerances, "precisions": list(CYCLE)}
    )


def test_a_mixed_policy_on_a_trained_model_passes_validation(
    trained_tiny_resnet, digits_splits, cpu_profile, tmp_path
):
    model = trained_tiny_resnet
    layers = policy_layers(model)
    precisions = _mixed(layers)
    fp32 = export_onnx(model, tuple(cpu_profile.input.shape), tmp_path / "fp32.onnx")
    calib, _ = stack(digits_splits.calib)
    out = tmp_path / "model.onnx"
    quantize_onnx(fp32, out, precisions, cpu_profile.int8, calib)
    assert layer_precisions(out, layers) == precisions

    inputs, labels = stack(digits_splits.test)
    reference = torch_logits(model, inputs)
    assert len(np.unique(reference.argmax(axis=1))) >= 8, "a trivial model proves nothing"
    record = compare_deployed(
        cpu_profile, run_onnx(out, inputs), reference, reference, labels, set(precisions.values())
    )
    assert record["passed"], record["reasons"]
    assert record["tolerance_precision"] == "int8"  # the loosest precision present decides
    assert record["fidelity"]["tolerance"] == cpu_profile.tolerances.int8.model_dump()
    assert record["top1_agreement"] >= 0.99
    stats = record["outputs"]["logits"]["fidelity"]
    assert stats["nan_count"] == stats["inf_count"] == 0
    assert 0 < stats["median_abs_error"] <= stats["mean_abs_error"] * 10
    assert stats["max_abs_error"] >= stats["median_abs_error"]
    assert stats["max_rel_error"] > 0
    json.dumps(record, allow_nan=False)  # validation.json stays strict JSON


def test_an_fp16_policy_is_judged_by_the_fp16_tolerance(
    trained_tiny_resnet, digits_splits, cpu_profile, tmp_path
):
    model = trained_tiny_resnet
    layers = policy_layers(model)
    fp32 = export_onnx(model, tuple(cpu_profile.input.shape), tmp_path / "fp32.onnx")
    out = tmp_path / "fp16.onnx"
    precisions = {**dict.fromkeys(layers, FP16), "fc": FP32}
    quantize_onnx(fp32, out, precisions, cpu_profile.int8, np.zeros((1, 3, 32, 32), np.float32))
    inputs, labels = stack(digits_splits.test)
    reference = torch_logits(model, inputs)
    deployed = run_onnx(out, inputs)
    record = compare_deployed(cpu_profile, deployed, reference, reference, labels, {FP16, FP32})
    assert record["tolerance_precision"] == "fp16"
    assert record["passed"], record["reasons"]
    # FP16 really ran: the logits differ from FP32, by less than the FP16 tolerance.
    assert 0 < record["max_abs_error"] <= cpu_profile.tolerances.fp16.atol


def test_nan_in_the_deployed_logits_fails_validation_with_counts(cpu_profile):
    reference = np.eye(10, dtype=np.float32)[np.arange(20) % 10] * 5
    deployed = reference.copy()
    deployed[0, 0], deployed[1, 1] = np.nan, np.inf
    labels = np.arange(20) % 10
    record = compare_deployed(cpu_profile, deployed, reference, reference, labels, {FP16})
    assert not record["passed"]
    assert record["nan_count"] == 1 and record["inf_count"] == 1
    assert record["outputs"]["logits"]["task"]["nan_or_inf"] is True
    json.dumps(record, allow_nan=False)
