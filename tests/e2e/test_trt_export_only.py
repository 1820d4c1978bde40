"""A TensorRT target on a machine without TensorRT: a run with a fixed policy still exports
model.onnx, checks it against TensorRT's Q/DQ rules, and then stops in one line, so the graph
can be built and timed on the device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli as cli
from safetensors.torch import save_file

from exporters.trt_rules import check_trt_qdq
from pipeline.measure.runners.trt import TrtRunner

pytestmark = pytest.mark.e2e

PROFILE = """
name: tiny-trt
description: tiny TensorRT target for tests
runtime: tensorrt
precisions: [int8, fp32]
input: {shape: [3, 32, 32], batch: 4}
threads: 1
channel_multiple: 8
min_keep_ratio: 0.1
max_accuracy_drop: 0.5
measure: {warmup: 3, repeats: 30}
int8: {format: qdq, activation_type: int8, weight_type: int8, per_channel: true,
       calibration: minmax, calib_samples: 32}
"""


def test_run_without_tensorrt_exports_checked_onnx_then_stops(
    tmp_path: Path, trained_tiny_resnet
) -> None:
    reason = TrtRunner.unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are here: the run goes on to build the engine")
    (tmp_path / "tiny-trt.yaml").write_text(PROFILE)
    state = {k: v.contiguous() for k, v in trained_tiny_resnet.state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    result = cli(
        *("run", "--target", "tiny-trt.yaml", "--model", "conftest:make_tiny_resnet"),
        *("--weights", "tiny.safetensors", "--policy", "uniform:0.5:int8"),
        *("--finetune-steps", "5", "--out", "runs", "--no-progress"),
        cwd=tmp_path,
    )
    err = result.stderr.strip()
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(err.splitlines()) == 1, err
    assert "runtime 'tensorrt' (profile 'tiny-trt') is not available on this machine" in err
    assert "tensorrt is not installed" in err and "passes TensorRT's Q/DQ rules" in err
    (run_dir,) = (tmp_path / "runs").iterdir()
    graph = run_dir / "model.onnx"
    assert graph.is_file() and check_trt_qdq(graph) == []
    notes = json.loads((run_dir / "tensorrt.json").read_text())
    assert notes["tensorrt_qdq"] == [] and reason.startswith(notes["runtime_missing"][:20])
    assert notes["trtexec"]["build"].startswith("trtexec --onnx=model.onnx")
    assert "--stronglyTyped" in notes["trtexec"]["build"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "stopped: exported, runtime not available here"
    assert manifest["stages_done"][-1] == "export"
