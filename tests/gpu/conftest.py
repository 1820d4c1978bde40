"""GPU tests: TensorRT engines and the CUDA / TensorRT runners on a real NVIDIA GPU.

Run them on a GPU machine after `pip install .[gpu]`:  `pytest tests/gpu`. Elsewhere every test
here is skipped with the reason (no CUDA device, tensorrt not installed, no CUDA provider).

The graphs are a briefly trained ResNet-10 on the digits data (from the root conftest), exported
as FP32, with every layer in FP16 (float16 typed tensors) and with every layer but the stem and
the classifier in INT8 (Q/DQ in the S8S8 scheme TensorRT takes), all through the project's own
exporters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.policy import Precision
from pipeline.core.profile import InputSpec, Int8Scheme, MeasureSpec, TargetProfile

SHAPE = (3, 32, 32)
BATCH = 8
SAMPLES = 96  # test-split images compared between runtimes
INT8_SCHEME = Int8Scheme(
    format="qdq",
    activation_type="int8",  # TensorRT takes symmetric S8S8 Q/DQ only
    weight_type="int8",
    per_channel=True,
    calibration="minmax",
    calib_samples=64,
)


def _skip_unless(reason: str | None) -> None:
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def cuda() -> None:
    """Skip unless a CUDA device is usable."""
    from pipeline.core.cuda_device import no_cuda_reason

    _skip_unless(no_cuda_reason())


@pytest.fixture(scope="session")
def trt(cuda: None) -> Any:
    """The tensorrt module; skip unless TensorRT 10+ and a GPU are here."""
    from exporters.tensorrt import tensorrt_unavailable_reason

    _skip_unless(tensorrt_unavailable_reason())
    import tensorrt

    return tensorrt


@pytest.fixture(scope="session")
def ort_cuda(cuda: None) -> None:
    """Skip unless onnxruntime-gpu's CUDA provider is installed."""
    from pipeline.measure.runners.ort_cuda import OrtCudaRunner

    _skip_unless(OrtCudaRunner.unavailable_reason())


@pytest.fixture(scope="session")
def ort_trt(cuda: None) -> None:
    """Skip unless onnxruntime-gpu's TensorRT provider and TensorRT are installed."""
    from pipeline.measure.runners.ort_trt import OrtTrtRunner

    _skip_unless(OrtTrtRunner.unavailable_reason())


def make_gpu_profile(runtime: str = "tensorrt", **changes: Any) -> TargetProfile:
    """A small GPU target: 3x32x32 inputs in batches of 8, quick measurements."""
    data: dict[str, Any] = {
        "name": "gpu-test",
        "runtime": runtime,
        "precisions": [Precision.INT8, Precision.FP16, Precision.FP32],
        "input": InputSpec(shape=SHAPE, batch=BATCH),
        "measure": MeasureSpec(warmup=5, repeats=30),
        "int8": INT8_SCHEME,
    }
    return TargetProfile(**{**data, **changes})


@pytest.fixture(scope="session")
def gpu_profile() -> Callable[..., TargetProfile]:
    """`gpu_profile(runtime, **changes)`: a small GPU target profile."""
    return make_gpu_profile


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@pytest.fixture(scope="session")
def trained_model(cuda: None, _trained_tiny_resnet_state: dict[str, torch.Tensor]) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.load_state_dict(_trained_tiny_resnet_state)
    return model.eval()


@pytest.fixture(scope="session")
def graphs(
    tmp_path_factory: pytest.TempPathFactory, trained_model: nn.Module, digits_splits: Any
) -> dict[str, Path]:
    """{"fp32", "fp16", "int8"} -> ONNX graph of the trained ResNet-10, written by the exporters."""
    from exporters import export_onnx, quantize_onnx
    from pipeline.model.evaluate import stack

    folder = tmp_path_factory.mktemp("gpu-graphs")
    fp32 = export_onnx(trained_model, SHAPE, folder / "fp32.onnx")
    calib, _ = stack(digits_splits.calib)
    out = {"fp32": fp32}
    for precision in (Precision.FP16, Precision.INT8):
        policy = dict.fromkeys(_layers(trained_model), precision)
        if precision == Precision.INT8:  # the usual INT8 policy: stem and classifier stay FP32
            policy.update({"conv1": Precision.FP32, "fc": Precision.FP32})
        path = folder / f"{precision.value}.onnx"
        quantize_onnx(fp32, path, policy, INT8_SCHEME, calib)
        out[precision.value] = path
    return out


@pytest.fixture(scope="session")
def test_batch(cuda: None, digits_splits: Any) -> tuple[np.ndarray, np.ndarray]:
    """The first test-split images (N, 3, 32, 32) float32 and their labels."""
    from pipeline.model.evaluate import stack

    inputs, labels = stack(digits_splits.test)
    return inputs[:SAMPLES], labels[:SAMPLES]
