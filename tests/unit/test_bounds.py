"""Every number that comes in has an upper bound no real target needs to pass, named in a
one-line error (exit 2); `pipeline bench` stops a measurement that runs past its timeout."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_main import main_in_process
from conftest import TINY_PROFILE

from exporters import export_onnx
from pipeline.core.config import RunConfig, load_config
from pipeline.core.errors import ConfigError
from pipeline.core.profile import TargetProfile, load_profile


def write_profile(folder: Path, **changes: object) -> Path:
    data = {**TINY_PROFILE}
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            data[section] = {**data.get(section, {}), key: value}
        else:
            data[section] = value
    path = folder / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("change", "field", "limit"),
    [
        ({"threads": 100_000}, "threads", "1024"),
        ({"measure__repeats": 10**9}, "measure.repeats", "10000000"),
        ({"measure__warmup": 10**7}, "measure.warmup", "100000"),
        ({"measure__rounds": 10_000}, "measure.rounds", "100"),
        ({"input": {"shape": [3, 32, 32], "batch": 100_000}}, "input.batch", "4096"),
        ({"input": {"shape": [3, 10**6, 32], "batch": 1}}, "input.shape.1", "16384"),
        ({"input": {"shape": [64, 4096, 4096], "batch": 64}}, "input", "268,435,456"),
        ({"channel_multiple": 10**6}, "channel_multiple", "1024"),
        ({"budget_ms": 1e12}, "budget_ms", "3600000"),
        ({"int8__calib_samples": 10**9}, "int8.calib_samples", "100000"),
    ],
)
def test_profile_numbers_have_named_upper_bounds(tmp_path, change, field, limit) -> None:
    path = write_profile(tmp_path, **change)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert field in message and limit in message, message
    assert len(message.splitlines()) == 1


def test_a_device_timeout_and_retries_are_bounded(tmp_path) -> None:
    device = {"url": "http://127.0.0.1:1", "timeout_s": 1e9, "retries": 3}
    with pytest.raises(ConfigError, match=r"device\.timeout_s.*86400"):
        load_profile(write_profile(tmp_path, device=device))
    device = {"url": "http://127.0.0.1:1", "retries": 10**6}
    with pytest.raises(ConfigError, match=r"retries.*100"):
        load_profile(write_profile(tmp_path, device=device))


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_infinity_are_refused(tmp_path, value) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(TINY_PROFILE) + f"budget_ms: {value}\n")
    with pytest.raises(ConfigError, match="budget_ms"):
        load_profile(path)


def test_the_bounds_admit_every_shipped_profile_and_the_defaults() -> None:
    for name in ("cpu", "gpu-trt", "jetson", "jetson-agx-orin"):
        load_profile(name)
    TargetProfile.model_validate(TINY_PROFILE)
    RunConfig()


@pytest.mark.parametrize(
    ("overrides", "sections", "field", "limit"),
    [
        ({"seed": -1}, {}, "seed", "greater than or equal to 0"),
        ({"seed": 2**40}, {}, "seed", "2147483647"),
        ({"num_classes": 10**9}, {}, "num_classes", "1000000"),
        ({"opset": 99}, {}, "opset", "23"),
        ({}, {"search": {"episodes": 10**9}}, "search.episodes", "100000"),
        ({}, {"search": {"candidate_steps": 10**12}}, "search.candidate_steps", "10000000"),
        ({}, {"search": {"timeout_s": 1e9}}, "search.timeout_s", "86400"),
        ({}, {"finetune": {"steps": 10**12}}, "finetune.steps", "10000000"),
        ({}, {"finetune": {"batch_size": 10**7}}, "finetune.batch_size", "65536"),
    ],
)
def test_run_config_numbers_have_named_bounds(overrides, sections, field, limit) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides, sections)
    assert field in str(info.value) and limit in str(info.value), str(info.value)


def test_a_parallel_section_is_bounded(tmp_path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("search:\n  parallel:\n    workers: 100000\n")
    with pytest.raises(ConfigError, match=r"search\.parallel\.workers.*1024"):
        load_config(path, {})


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("run", "--target", "cpu", "--seed", "-5"), "seed"),
        (("run", "--target", "cpu", "--episodes", "100000000"), "episodes"),
        (("device", "serve", "--port", "70000"), "--port"),
        (("device", "serve", "--port", "0"), "--port"),
        (("bench", "--target", "cpu", "--timeout-s", "0", "m.onnx"), "--timeout-s"),
        (("bench", "--target", "cpu", "--timeout-s", "1e9", "m.onnx"), "--timeout-s"),
    ],
)
def test_out_of_range_options_are_one_line_and_exit_2(tmp_path, monkeypatch, args, named) -> None:
    monkeypatch.chdir(tmp_path)
    result = main_in_process(*args)
    assert result.code == 2, result
    assert result.one_line_error and named in result.err, result.err
    assert not (tmp_path / "runs").exists()


def test_bench_stops_a_measurement_past_its_timeout(tmp_path, monkeypatch, tiny_resnet) -> None:
    # Ten million timed runs: far longer than the one second the measurement is given.
    path = write_profile(tmp_path, measure__repeats=10_000_000)
    export_onnx(tiny_resnet, (3, 32, 32), tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    result = main_in_process("bench", "--target", str(path), "--timeout-s", "1", "m.onnx")
    assert result.code == 1, result
    assert "timed out after 1 s" in result.err and result.one_line_error, result.err
