"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, no run dir.

The CLI runs in this process (`cli_main`), in the test's folder; the last test runs it as
users do, in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from cli_main import Result, main_in_process
from conftest import run_cli

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CPU = str(ROOT / "profiles" / "cpu.yaml")


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def pipeline(*args: str, cwd: Path) -> Result:
    with _inside(cwd):
        return main_in_process(*args)


def assert_bad_input(result: Result, *fragments: str) -> None:
    err = result.err.strip()
    assert result.code == 2, (result.code, result.out, result.err)
    assert result.one_line_error, err
    for fragment in fragments:
        assert fragment in err, err


def small_profile(tmp_path: Path, **changes: str) -> str:
    """A copy of the CPU profile with some top-level lines replaced."""
    lines, skipping = [], False
    for line in Path(CPU).read_text().splitlines():
        if skipping and line.startswith(" "):
            continue  # the replaced key's nested lines
        key = line.split(":", 1)[0]
        skipping = key in changes
        if skipping:
            line = f"{key}: {changes.pop(key)}"
        lines.append(line)
    lines += [f"{k}: {v}" for k, v in changes.items()]
    path = tmp_path / "profile.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: cpu\nruntime: [onnxruntime-cpu\n")
    assert_bad_input(pipeline("run", "--target", str(bad), cwd=tmp_path), "malformed YAML")


def test_unknown_profile_key(tmp_path):
    profile = small_profile(tmp_path, warp_speed="9")
    result = pipeline("run", "--target", profile, cwd=tmp_path)
    assert_bad_input(result, "unknown key 'warp_speed'", "allowed keys")


def test_missing_profile(tmp_path):
    result = pipeline("run", "--target", "nowhere.yaml", cwd=tmp_path)
    assert_bad_input(result, "target profile not found", "nowhere.yaml")


def test_runtime_not_available_here(tmp_path):
    result = pipeline("run", "--target", str(ROOT / "profiles" / "gpu-trt.yaml"), cwd=tmp_path)
    assert_bad_input(result, "tensorrt", "not available")
    assert not (tmp_path / "runs").exists()


def test_missing_weights(tmp_path):
    args = ("--model", "resnet18", "--weights", "missing.safetensors")
    result = pipeline("run", "--target", CPU, *args, cwd=tmp_path)
    assert_bad_input(result, "missing.safetensors")


def test_weights_that_need_pickle_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10), tmp_path / "whole.pt")
    args = ("--model", "resnet18", "--weights", "whole.pt")
    result = pipeline("run", "--target", CPU, *args, cwd=tmp_path)
    assert_bad_input(result, "pickle", "state_dict")


def test_unknown_architecture(tmp_path):
    args = ("--model", "resnet19", "--random-init")
    result = pipeline("run", "--target", CPU, *args, cwd=tmp_path)
    assert_bad_input(result, "resnet19", "module:function")


def test_missing_data_folder(tmp_path):
    args = ("--model", "resnet18", "--random-init", "--data", "imagefolder:nope")
    result = pipeline("run", "--target", CPU, *args, cwd=tmp_path)
    assert_bad_input(result, "nope")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    args = ("--model", "resnet18", "--random-init", "--data", "imagefolder:empty")
    result = pipeline("run", "--target", CPU, *args, cwd=tmp_path)
    assert_bad_input(result, "no images")


@pytest.mark.parametrize("budget", ["0", "-3"])
def test_non_positive_budget(tmp_path, budget):
    result = pipeline("run", "--target", CPU, f"--budget-ms={budget}", cwd=tmp_path)
    assert_bad_input(result, "budget_ms", "greater than 0")


def test_negative_budget_in_profile(tmp_path):
    profile = small_profile(tmp_path, budget_ms="-1")
    assert_bad_input(pipeline("run", "--target", profile, cwd=tmp_path), "budget_ms")


def test_input_shape_the_model_rejects(tmp_path):
    profile = small_profile(tmp_path, input="{shape: [1, 32, 32], batch: 1}")
    args = ("--model", "resnet18", "--random-init")
    result = pipeline("run", "--target", profile, *args, cwd=tmp_path)
    assert_bad_input(result, "rejects input shape", "input.shape")


def test_unknown_policy_layer(tmp_path):
    (tmp_path / "policy.json").write_text(
        json.dumps({"layers": {"layer7.conv": {"keep_ratio": 0.5, "precision": "fp32"}}})
    )
    profile = small_profile(tmp_path, input="{shape: [3, 32, 32], batch: 1}")
    args = ("--model", "resnet18", "--random-init", "--policy", "policy.json")
    result = pipeline("run", "--target", profile, *args, cwd=tmp_path)
    assert_bad_input(result, "unknown layer 'layer7.conv'")
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "run", "--target", "nowhere.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_bench_missing_artifact(tmp_path):
    assert_bad_input(pipeline("bench", "--target", CPU, "absent.onnx", cwd=tmp_path), "absent.onnx")


def test_validate_not_a_run_dir(tmp_path):
    result = pipeline("validate", "--target", CPU, str(tmp_path), cwd=tmp_path)
    assert_bad_input(result, "not a run directory")


def test_the_installed_command_in_a_subprocess(tmp_path):
    result = run_cli("run", "--target", "nowhere.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "target profile not found" in lines[0]
