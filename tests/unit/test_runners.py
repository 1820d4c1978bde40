"""Runners, latency statistics and the runner registry, on real ONNX Runtime sessions."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.errors import ConfigError, ModelError, RuntimeNotAvailable
from pipeline.core.profile import InputSpec, MeasureSpec, RemoteDevice, TargetProfile
from pipeline.measure.runners import (
    LatencyStats,
    Runner,
    check_runtime,
    get_runner,
    profile_input,
    runner_class,
)
from pipeline.measure.runners.ort_cpu import OrtCpuRunner

SHAPE = (3, 16, 16)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 10)
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = TinyNet().eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but still exact
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.randn(1, *SHAPE),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return model, path


def make_profile(**kw: object) -> TargetProfile:
    defaults: dict[str, object] = {
        "name": "t",
        "runtime": "onnxruntime-cpu",
        "input": InputSpec(shape=SHAPE, batch=1),
        "measure": MeasureSpec(warmup=2, repeats=30),
    }
    return TargetProfile(**{**defaults, **kw})


# --------------------------------------------------------------------------- LatencyStats


def test_stats_match_numpy() -> None:
    samples = [0.004, 0.001, 0.002, 0.010, 0.003, 0.002, 0.005]
    ms = np.array(samples) * 1e3
    stats = LatencyStats.from_samples(samples, warmup=3, batch=2)
    assert stats.median_ms == pytest.approx(np.median(ms), rel=1e-12)
    assert stats.p90_ms == pytest.approx(np.percentile(ms, 90), rel=1e-12)
    assert stats.mean_ms == pytest.approx(ms.mean(), rel=1e-12)
    assert stats.std_ms == pytest.approx(ms.std(), rel=1e-12)
    assert stats.cv == pytest.approx(ms.std() / ms.mean(), rel=1e-12)
    assert (stats.min_ms, stats.max_ms) == (pytest.approx(1.0), pytest.approx(10.0))
    assert (stats.warmup, stats.repeats, stats.batch) == (3, 7, 2)


def test_stats_round_trip_and_value() -> None:
    stats = LatencyStats.from_samples([0.001, 0.002, 0.003], warmup=1, batch=1)
    assert LatencyStats.from_dict(stats.to_dict()) == stats
    assert LatencyStats.from_dict({**stats.to_dict(), "floor_ms": 0.1}) == stats
    assert stats.value("median") == stats.median_ms
    assert stats.value("p90") == stats.p90_ms
    assert stats.value("mean") == stats.mean_ms
    with pytest.raises(ValueError, match="unknown statistic"):
        stats.value("max")
    with pytest.raises(ValueError, match="lack key"):
        LatencyStats.from_dict({"median_ms": 1.0})


@pytest.mark.parametrize("bad", [[], [0.001, float("nan")], [-0.001]])
def test_stats_reject_bad_samples(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        LatencyStats.from_samples(bad, warmup=1, batch=1)


def test_profile_input_is_fixed() -> None:
    profile = make_profile(input=InputSpec(shape=SHAPE, batch=3))
    a, b = profile_input(profile), profile_input(profile)
    assert a.shape == (3, *SHAPE) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- lifecycle


def test_lifecycle_errors(tiny: tuple[nn.Module, Path]) -> None:
    runner = OrtCpuRunner(tiny[1], make_profile())
    feed = profile_input(runner.profile)
    with pytest.raises(RuntimeError, match="before activate"):
        runner.infer(feed)
    with pytest.raises(RuntimeError, match="before activate"):
        runner.measure()
    with pytest.raises(RuntimeError, match="before activate"):
        runner.deactivate()
    runner.activate()
    with pytest.raises(RuntimeError, match="already active"):
        runner.activate()
    with pytest.raises(ValueError, match="at least 30"):
        runner.measure(warmup=1, repeats=29)
    with pytest.raises(ValueError, match="float32"):
        runner.infer(feed.astype(np.float64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        runner.infer(feed[0])
    runner.deactivate()
    assert not runner.is_active


def test_context_manager_deactivates(tiny: tuple[nn.Module, Path]) -> None:
    with OrtCpuRunner(tiny[1], make_profile()) as runner:
        assert runner.is_active
    assert not runner.is_active
    with pytest.raises(RuntimeError):
        runner.infer(profile_input(runner.profile))


def test_infer_matches_torch(tiny: tuple[nn.Module, Path]) -> None:
    model, path = tiny
    feed = np.random.default_rng(1).standard_normal((4, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(feed)).numpy()
    with OrtCpuRunner(path, make_profile()) as runner:
        got = runner.infer(feed)
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_measure_returns_stats(tiny: tuple[nn.Module, Path]) -> None:
    profile = make_profile(input=InputSpec(shape=SHAPE, batch=2), threads=2)
    with OrtCpuRunner(tiny[1], profile) as runner:
        assert runner.session.get_session_options().intra_op_num_threads == 2
        assert runner.session.get_session_options().inter_op_num_threads == 1
        stats = runner.measure()
        explicit = runner.measure(warmup=1, repeats=31)
    assert stats.repeats >= 30 and stats.warmup == 2 and stats.batch == 2
    assert stats.median_ms > 0 and stats.min_ms <= stats.median_ms <= stats.max_ms
    assert stats.p90_ms >= stats.median_ms and stats.cv >= 0
    assert (explicit.repeats, explicit.warmup) == (31, 1)


def test_wrong_input_shape_is_model_error(tiny: tuple[nn.Module, Path]) -> None:
    with OrtCpuRunner(tiny[1], make_profile()) as runner, pytest.raises(ModelError, match="shape"):
        runner.infer(np.zeros((1, 5, 16, 16), dtype=np.float32))


def test_broken_onnx_is_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    runner = OrtCpuRunner(bad, make_profile())
    with pytest.raises(ModelError, match="cannot load") as info:
        runner.activate()
    assert "\n" not in str(info.value)
    assert not runner.is_active


def test_missing_or_foreign_artifact_is_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        get_runner(make_profile(), tmp_path / "missing.onnx")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    with pytest.raises(ModelError, match=r"runs \.onnx"):
        get_runner(make_profile(), engine)


# --------------------------------------------------------------------------- registry


def test_registry_picks_ort_cpu(tiny: tuple[nn.Module, Path]) -> None:
    runner = get_runner(make_profile(), tiny[1])
    assert isinstance(runner, OrtCpuRunner) and isinstance(runner, Runner)
    assert not runner.is_active
    assert runner_class("onnxruntime-cpu") is OrtCpuRunner
    assert check_runtime(make_profile()) is OrtCpuRunner


@pytest.mark.parametrize("runtime", ["tensorrt", "onnxruntime-cuda"])
def test_gpu_runtimes_not_available(runtime: str, tiny: tuple[nn.Module, Path]) -> None:
    profile = make_profile(name="gpu-x", runtime=runtime)
    with pytest.raises(RuntimeNotAvailable) as info:
        get_runner(profile, tiny[1])
    with pytest.raises(RuntimeNotAvailable):
        check_runtime(profile)  # fails fast without an artifact too
    msg = str(info.value)
    assert f"runtime '{runtime}' (profile 'gpu-x') is not available" in msg
    assert "onnxruntime-cpu" in msg and "\n" not in msg


def test_remote_device_needs_its_token(tiny: tuple[nn.Module, Path], monkeypatch) -> None:
    monkeypatch.delenv("PIPELINE_DEVICE_TOKEN", raising=False)
    profile = make_profile(device=RemoteDevice(url="http://jetson:8000"))
    with pytest.raises(ConfigError, match=r"\$PIPELINE_DEVICE_TOKEN"):
        get_runner(profile, tiny[1])
    with pytest.raises(ConfigError, match=r"\$PIPELINE_DEVICE_TOKEN"):
        check_runtime(profile)


def test_import_needs_no_runtime() -> None:
    code = (
        "import sys, pipeline.measure.runners, pipeline.measure.bench\n"
        "heavy = ('tensorrt', 'pycuda', 'pipeline.measure.runners.ort_cpu')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
