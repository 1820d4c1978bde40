"""`pipeline bench --target profiles/gpu-trt.yaml model.engine`, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from exporters import export_onnx
from exporters.tensorrt import build_engine, metadata_path
from pipeline.core.profile import load_profile

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
GPU_TRT = ROOT / "profiles" / "gpu-trt.yaml"


def pipeline_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def shipped_engine(trt: Any, trained_model: nn.Module, tmp_path_factory) -> Path:
    """The trained ResNet-10 at the shipped gpu-trt profile's input, as model.onnx + engine."""
    profile = load_profile(GPU_TRT)
    folder = tmp_path_factory.mktemp("run")
    onnx_path = export_onnx(trained_model, profile.input.shape, folder / "model.onnx")
    build_engine(onnx_path, profile, folder / "model.engine")
    return folder / "model.engine"


def test_bench_runs_an_engine(shipped_engine: Path, tmp_path: Path) -> None:
    result = pipeline_cli(
        "bench", "--target", str(GPU_TRT), str(shipped_engine), "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    profile = load_profile(GPU_TRT)
    assert report["runtime"] == "tensorrt"
    assert report["artifact"] == str(shipped_engine)
    assert report["batch"] == profile.input.batch
    assert report["repeats"] == profile.measure.repeats
    assert 0 < report["latency_ms"]["min"] <= report["latency_ms"]["median"]
    assert report["floor_ms"] is None  # no GPU peaks in the profile: no floor to claim


def test_bench_refuses_an_engine_from_elsewhere(shipped_engine: Path, tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(shipped_engine.read_bytes())
    meta = json.loads(metadata_path(shipped_engine).read_text())
    meta["device"] = {"name": "NVIDIA Imaginary GPU", "compute_capability": "9.9"}
    metadata_path(engine).write_text(json.dumps(meta))
    result = pipeline_cli("bench", "--target", str(GPU_TRT), str(engine), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "NVIDIA Imaginary GPU" in err and "rebuild it on this device" in err
