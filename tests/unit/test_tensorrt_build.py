"""What an engine build asks of Polygraphy, and how a missing TensorRT is told, on a machine
without TensorRT: the build settings are plain data, and Polygraphy's config loader is built
from them without importing TensorRT (it imports it only when the config is applied)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from exporters.tensorrt import require_tensorrt, tensorrt_unavailable_reason
from exporters.tensorrt_build import TIMING_CACHE_NAME, build_settings, timing_cache_file
from exporters.tensorrt_meta import ShapeRange
from pipeline.core.errors import RuntimeNotAvailable

RANGES = ShapeRange((1, 3, 48, 48), (8, 3, 48, 48), (8, 3, 48, 48))
WORKSPACE = "workspace-pool"  # stands for trt.MemoryPoolType.WORKSPACE


def test_config_asks_for_no_tf32_the_workspace_and_the_profile(tmp_path: Path) -> None:
    settings = build_settings("input", RANGES, 1 << 30, tmp_path / TIMING_CACHE_NAME)
    kwargs = settings.config_kwargs(WORKSPACE)
    assert kwargs["tf32"] is False
    assert kwargs["memory_pool_limits"] == {WORKSPACE: 1 << 30}
    (profile,) = kwargs["profiles"]
    shapes = profile["input"]
    assert (tuple(shapes.min), tuple(shapes.opt), tuple(shapes.max)) == (
        RANGES.min,
        RANGES.opt,
        RANGES.max,
    )
    assert kwargs["load_timing_cache"] is None  # nothing saved yet: nothing to load


def test_a_saved_timing_cache_is_loaded_and_recorded(tmp_path: Path) -> None:
    cache = tmp_path / TIMING_CACHE_NAME
    cache.write_bytes(b"")
    assert build_settings("input", RANGES, 1 << 20, cache).timing_cache_reused is False
    cache.write_bytes(b"timings")
    settings = build_settings("input", RANGES, 1 << 20, cache)
    assert settings.config_kwargs(WORKSPACE)["load_timing_cache"] == str(cache)
    meta = settings.metadata(1.23456)
    assert meta == {
        "workspace_bytes": 1 << 20,
        "strongly_typed": True,
        "tf32": False,
        "timing_cache": str(cache),
        "timing_cache_reused": True,
        "build_s": 1.235,
    }


def test_no_timing_cache(tmp_path: Path) -> None:
    assert timing_cache_file(tmp_path / "m.engine", True) == tmp_path / TIMING_CACHE_NAME
    assert timing_cache_file(tmp_path / "m.engine", tmp_path / "c") == tmp_path / "c"
    assert timing_cache_file(tmp_path / "m.engine", False) is None
    settings = build_settings("input", RANGES, 1 << 20, None)
    assert settings.config_kwargs(WORKSPACE)["load_timing_cache"] is None
    assert settings.metadata(0.0)["timing_cache"] is None


def test_polygraphy_takes_the_config_without_tensorrt(tmp_path: Path) -> None:
    from polygraphy.backend.trt import CreateConfig

    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT is here: tests/gpu builds engines")
    config = CreateConfig(**build_settings("input", RANGES, 1 << 20, None).config_kwargs(WORKSPACE))
    assert config.tf32 is False and config.memory_pool_limits == {WORKSPACE: 1 << 20}
    assert "tensorrt" not in sys.modules or not hasattr(sys.modules["tensorrt"], "Builder")


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        (None, "tensorrt is not installed, only its type stubs are (pip install .[gpu])"),
        ("8.6.1", "tensorrt 8.6.1 is too old: 10.x or newer is needed"),
    ],
)
def test_missing_or_old_tensorrt_is_one_line(
    monkeypatch: pytest.MonkeyPatch, version: str | None, fragment: str
) -> None:
    """The type stubs alone make `import tensorrt` succeed, as an empty namespace package."""
    fake = types.ModuleType("tensorrt")
    if version is not None:
        fake.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(RuntimeNotAvailable) as info:
        require_tensorrt()
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert tensorrt_unavailable_reason() == str(info.value)


def test_tensorrt_10_and_11_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("10.3.0", "11.0.0.1"):
        fake = types.ModuleType("tensorrt")
        fake.__version__ = version  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        assert require_tensorrt() == version


def test_trt_runner_says_tensorrt_is_missing_here() -> None:
    from pipeline.core.cuda_device import no_cuda_reason
    from pipeline.measure.runners.trt import TrtRunner

    trt_reason = tensorrt_unavailable_reason()
    if trt_reason is None:
        pytest.skip("TensorRT is here")
    reason = TrtRunner.unavailable_reason()
    assert reason is not None and reason.startswith(trt_reason)
    cuda = no_cuda_reason()
    assert cuda is None or reason.endswith(cuda)  # both, when both are missing
