"""`pipeline run` on a local TensorRT target ships model.engine next to model.onnx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file
from torch import nn

pytestmark = pytest.mark.gpu

TESTS = Path(__file__).resolve().parents[1]  # the model spec `conftest:...` is the root one

PROFILE = """
name: gpu-tiny
description: local TensorRT, tiny input for tests
runtime: tensorrt
precisions: [int8, fp16, fp32]
input: {shape: [3, 32, 32], batch: 8}
channel_multiple: 8
max_accuracy_drop: 0.2
measure: {warmup: 5, repeats: 30}
int8: {format: qdq, activation_type: int8, weight_type: int8, per_channel: true}
"""

CONFIG = """
model: conftest:make_tiny_resnet
weights: tiny.safetensors
out: runs
show_progress: false
finetune: {steps: 10}
"""


def test_a_fixed_policy_run_builds_and_validates_the_engine(
    trt: Any, trained_model: nn.Module, tmp_path: Path
) -> None:
    (tmp_path / "gpu.yaml").write_text(PROFILE)
    (tmp_path / "pipeline.yaml").write_text(CONFIG)
    state = {k: v.contiguous() for k, v in trained_model.state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    args = ["--target", "gpu.yaml", "--config", "pipeline.yaml", "--policy", "uniform:0.5:fp16"]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode in (0, 1), result.stderr
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert (run_dir / "model.engine").is_file() and (run_dir / "model.engine.json").is_file()
    meta = json.loads((run_dir / "model.engine.json").read_text())
    assert meta["profile"] == "gpu-tiny"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["runtime"] == "tensorrt" and report["engine"] is not None
    assert report["deployed"]["latency_ms"]["median"] > 0
