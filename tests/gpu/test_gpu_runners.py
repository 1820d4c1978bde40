"""Each GPU runner measures and infers, and its logits agree with ONNX Runtime's CPU provider
running the same graph, within the tolerance of the graph's precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporters import compare_logits, run_onnx
from exporters.tensorrt import build_engine
from pipeline.core.policy import Precision
from pipeline.measure.runners import LatencyStats, get_runner
from pipeline.measure.runners.ort_cuda import OrtCudaRunner
from pipeline.measure.runners.ort_trt import OrtTrtRunner
from pipeline.measure.runners.trt import TrtRunner
from pipeline.model.evaluate import batched_logits

pytestmark = pytest.mark.gpu

PRECISIONS = ("fp32", "fp16", "int8")
# The availability fixture (skip reason) of each runtime.
NEEDS = {"onnxruntime-cuda": "ort_cuda", "onnxruntime-trt": "ort_trt", "tensorrt": "trt"}
CLASSES = {
    "onnxruntime-cuda": OrtCudaRunner,
    "onnxruntime-trt": OrtTrtRunner,
    "tensorrt": TrtRunner,
}


def _check_stats(stats: LatencyStats, repeats: int) -> None:
    assert stats.repeats == repeats and stats.batch == 8
    assert 0 < stats.min_ms <= stats.median_ms <= stats.max_ms
    assert all(np.isfinite([stats.mean_ms, stats.p90_ms, stats.cv]))


def _tolerance(profile: Any, runtime: str, precision: str) -> Any:
    # TensorRT inside ONNX Runtime builds weakly typed networks with TF32 allowed, so its FP32
    # layers may compute with a 10-bit mantissa: hold it to the FP16 tolerance, not FP32's.
    if runtime == "onnxruntime-trt" and precision == "fp32":
        return profile.tolerances.fp16
    return profile.tolerance_for({Precision(precision)})


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("runtime", sorted(NEEDS))
def test_runner_measures_and_agrees_with_cpu(
    runtime: str,
    precision: str,
    request: pytest.FixtureRequest,
    graphs: dict[str, Path],
    gpu_profile,
    test_batch,
    tmp_path: Path,
) -> None:
    request.getfixturevalue(NEEDS[runtime])
    profile = gpu_profile(runtime)
    graph = tmp_path / "model.onnx"
    graph.write_bytes(graphs[precision].read_bytes())  # caches go beside it, in tmp_path
    inputs, labels = test_batch
    with get_runner(profile, graph) as runner:
        assert isinstance(runner, CLASSES[runtime])
        stats = runner.measure(warmup=5, repeats=30)
        logits = batched_logits(runner.infer, inputs, profile.input.batch)
        again = runner.measure(warmup=2, repeats=30)  # infer in between does not break timing
    _check_stats(stats, 30)
    _check_stats(again, 30)
    reference = run_onnx(graph, inputs)
    result = compare_logits(reference, logits, labels, _tolerance(profile, runtime, precision))
    assert result.passed, result.reasons


def test_ort_cuda_runs_on_the_gpu(ort_cuda: None, graphs: dict[str, Path], gpu_profile) -> None:
    with get_runner(gpu_profile("onnxruntime-cuda"), graphs["fp32"]) as runner:
        assert runner.session.get_providers()[0] == "CUDAExecutionProvider"


def test_ort_trt_keeps_its_engines_beside_the_artifact(
    ort_trt: None, graphs: dict[str, Path], gpu_profile, tmp_path: Path
) -> None:
    graph = tmp_path / "model.onnx"
    graph.write_bytes(graphs["int8"].read_bytes())
    profile = gpu_profile("onnxruntime-trt")
    with get_runner(profile, graph) as runner:
        assert runner.session.get_providers()[0] == "TensorrtExecutionProvider"
        runner.infer(np.zeros((8, 3, 32, 32), dtype=np.float32))
    cache = tmp_path / "model.ort-trt-cache"
    assert cache.is_dir() and any(p.suffix == ".engine" for p in cache.iterdir())


def test_trt_runner_engine_and_onnx_agree(
    trt: Any, graphs: dict[str, Path], gpu_profile, tmp_path: Path, test_batch
) -> None:
    """The same graph given as .onnx (built on demand, cached) and as a built .engine."""
    profile = gpu_profile("tensorrt")
    engine = tmp_path / "model.engine"
    build_engine(graphs["fp16"], profile, engine)
    inputs, _ = test_batch
    outs = []
    for artifact in (engine, graphs["fp16"]):
        with get_runner(profile, artifact) as runner:
            outs.append(batched_logits(runner.infer, inputs, profile.input.batch))
    np.testing.assert_allclose(outs[0], outs[1], rtol=5e-2, atol=5e-2)
