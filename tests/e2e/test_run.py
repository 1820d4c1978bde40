"""The whole slice end to end through the CLI, at a tiny size: run, validate, bench."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli as cli
from safetensors.torch import save_file

from exporters import layer_precisions
from pipeline.core.artifacts import sha256_file
from pipeline.core.policy import Precision

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
RUN_FILES = {
    "original.onnx",
    "model.onnx",
    "policy.json",
    "pruning_history.json",
    "weights.safetensors",
    "validation.json",
    "report.json",
    "report.md",
    "pareto.png",
    "manifest.json",
}
SIDE_KEYS = {"accuracy", "latency_ms", "params", "macs", "size_bytes"}

PROFILE = """
name: tiny
description: tiny CPU target for tests
runtime: onnxruntime-cpu
precisions: [int8, fp32]
input: {shape: [3, 32, 32], batch: 1}
threads: 1
channel_multiple: 8
min_keep_ratio: 0.1
max_accuracy_drop: 0.05
measure: {warmup: 3, repeats: 30}
"""


@pytest.fixture
def workdir(tmp_path: Path, trained_tiny_resnet) -> Path:
    (tmp_path / "tiny.yaml").write_text(PROFILE)
    state = {k: v.contiguous() for k, v in trained_tiny_resnet.state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    return tmp_path


def run_args(*extra: str) -> list[str]:
    return [
        "run",
        "--target",
        "tiny.yaml",
        "--model",
        "conftest:make_tiny_resnet",
        "--weights",
        "tiny.safetensors",
        "--finetune-steps",
        "40",
        "--out",
        "runs",
        "--no-progress",
        *extra,
    ]


def only_run_dir(workdir: Path) -> Path:
    (run_dir,) = list((workdir / "runs").iterdir())
    return run_dir


def test_run_validate_bench(workdir: Path):
    result = cli(*run_args("--policy", "uniform:0.5:int8"), cwd=workdir)
    run_dir = only_run_dir(workdir)
    assert {p.name for p in run_dir.iterdir()} >= RUN_FILES, result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    # Whether INT8 measures faster than FP32 on this machine is not this test's business: the
    # gate that says so may fail (a given policy ships as given), and only that gate.
    failed = report["gates"]["failed"]
    speed = [reason for reason in failed if "slower than FP32" in reason]
    assert failed == speed, result.stdout + result.stderr
    assert bool(speed) == (not report["precision_check"]["not_slower"])
    assert result.returncode == (1 if speed else 0), result.stdout + result.stderr
    assert set(report["original"]) >= SIDE_KEYS and set(report["deployed"]) >= SIDE_KEYS
    assert report["deployed"]["macs"] < 0.5 * report["original"]["macs"]
    assert report["deployed"]["params"] < 0.5 * report["original"]["params"]
    for side in ("original", "deployed"):
        assert report[side]["latency_ms"]["median"] > 0
        assert 0.0 <= report[side]["accuracy"] <= 1.0
    expected = (
        report["original"]["latency_ms"]["median"] / report["deployed"]["latency_ms"]["median"]
    )
    assert report["speedup"] == pytest.approx(expected)
    assert report["validation"]["passed"]
    assert report["precision_check"]["speedup"] > 0
    # Every accuracy and the paired drop carry a 95% interval around the point figure
    for side in ("original", "deployed"):
        low, high = report[side]["accuracy_ci95"]
        assert low <= report[side]["accuracy"] <= high and high - low > 0
    low, high = report["accuracy_drop_ci95"]
    assert low <= report["accuracy_drop"] <= high
    assert report["accuracy_drop_within_noise"] == (low <= 0 <= high)
    if report["speedup_ci95"] is not None:  # two or more measuring rounds
        assert report["speedup_ci95"][0] <= report["speedup_ci95"][1]
    text = (run_dir / "report.md").read_text()
    assert f"on {report['test_images']:,} test images (95% intervals)" in text
    assert {"agent", "episodes", "real_measurements", "cached_measurements", "wall_s"} <= set(
        report["search"]
    )

    # The deployed graph runs every policy layer in INT8, as the policy says.
    policy = json.loads((run_dir / "policy.json").read_text())["layers"]
    actual = layer_precisions(run_dir / "model.onnx", list(policy))
    assert set(actual.values()) == {Precision.INT8}

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["versions"]["torch"] == "2.14.1"
    for name, digest in manifest["files"].items():
        assert sha256_file(run_dir / name) == digest, name
    splits = manifest["data"]
    assert splits is not None and "preprocessing" in json.dumps(splits)
    assert report["test_images"] == splits["sizes"]["test"]

    # `validate` rebuilds the pruned model from history + safetensors and re-compares.
    again = cli("validate", "--target", "tiny.yaml", str(run_dir), cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((run_dir / "validation.json").read_text())["passed"]

    bench = cli(
        "bench", "--target", "tiny.yaml", str(run_dir / "model.onnx"), "--json", cwd=workdir
    )
    assert bench.returncode == 0, bench.stderr
    stats = json.loads(bench.stdout)
    assert stats["latency_ms"]["median"] > 0 and stats["repeats"] >= 30


def test_a_missed_budget_fails_the_gate_with_exit_1(workdir: Path):
    result = cli(*run_args("--policy", "uniform:0.75", "--budget-ms", "0.0001"), cwd=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((only_run_dir(workdir) / "report.json").read_text())
    assert report["met_budget"] is False and not report["gates"]["passed"]
    assert "NOT deployable" in (only_run_dir(workdir) / "report.md").read_text()


def test_an_infeasible_budget_stops_before_the_search(workdir: Path):
    # A nanosecond per inference: below what any candidate can measure, on any machine
    args = run_args("--agent", "random", "--episodes", "4", "--budget-ms", "0.000001")
    result = cli(*args, cwd=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("infeasible:")]
    assert "ms below" in line and "fastest candidate" in line, line
    run_dir = only_run_dir(workdir)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["search"]["episodes"] == 0 and report["gates"]["failed"] == [line]
    assert not (run_dir / "episodes.jsonl").exists() and not (run_dir / "model.onnx").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed: infeasible budget"


def test_a_killed_run_leaves_nothing_that_looks_complete(workdir: Path):
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    args = run_args("--policy", "uniform:0.5")
    args[args.index("40")] = "100000"  # a fine-tune long enough to be killed during
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(workdir.glob("runs/*/pruning_history.json")):
            time.sleep(0.2)
        assert list(workdir.glob("runs/*/pruning_history.json")), "the run never started pruning"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    run_dir = only_run_dir(workdir)
    names = {p.name for p in run_dir.iterdir()}
    assert not names & {"report.json", "validation.json", "model.onnx"}
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"


def test_profiles_lists_the_shipped_targets(tmp_path: Path):
    result = cli("profiles", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("cpu", "jetson", "gpu-trt", "onnxruntime-cpu", "tensorrt"):
        assert name in result.stdout
