"""A graph mixing INT8 Q/DQ, FP16 and FP32 layers runs on each GPU runtime as on the CPU.

TensorRT reads the precisions from the graph (strongly typed: Q/DQ and float16 tensors with
Casts at their boundaries); its logits must agree with ONNX Runtime's CPU provider running the
same file within the INT8 tolerance (the loosest precision in it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from exporters import compare_logits, layer_precisions, quantize_onnx, run_onnx
from pipeline.core.policy import Precision, policy_layers
from pipeline.measure.runners import get_runner
from pipeline.model.evaluate import batched_logits, stack

pytestmark = pytest.mark.gpu

NEEDS = {"onnxruntime-cuda": "ort_cuda", "onnxruntime-trt": "ort_trt", "tensorrt": "trt"}
CYCLE = (Precision.INT8, Precision.FP16, Precision.FP32)


@pytest.fixture(scope="module")
def mixed_graph(
    tmp_path_factory: pytest.TempPathFactory,
    trained_model: nn.Module,
    graphs,
    digits_splits,
    gpu_profile,
) -> tuple[Path, dict[str, Precision]]:
    layers = policy_layers(trained_model)
    precisions = {name: CYCLE[i % 3] for i, name in enumerate(layers)}
    path = tmp_path_factory.mktemp("mixed") / "mixed.onnx"
    calib, _ = stack(digits_splits.calib)
    quantize_onnx(graphs["fp32"], path, precisions, gpu_profile("tensorrt").int8, calib)
    assert layer_precisions(path, layers) == precisions
    return path, precisions


@pytest.mark.parametrize("runtime", sorted(NEEDS))
def test_a_mixed_graph_agrees_with_the_cpu(
    runtime: str,
    request: pytest.FixtureRequest,
    mixed_graph,
    gpu_profile,
    test_batch,
    tmp_path: Path,
) -> None:
    request.getfixturevalue(NEEDS[runtime])
    source, _ = mixed_graph
    graph = tmp_path / "model.onnx"
    graph.write_bytes(source.read_bytes())  # engine caches go beside it, in tmp_path
    profile = gpu_profile(runtime)
    inputs, labels = test_batch
    with get_runner(profile, graph) as runner:
        logits = batched_logits(runner.infer, inputs, profile.input.batch)
    result = compare_logits(run_onnx(graph, inputs), logits, labels, profile.tolerances.int8)
    assert result.passed, result.reasons
