"""Target profile schema: shipped profiles load, bad input gives one clear ConfigError."""

from pathlib import Path

import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.policy import Precision
from pipeline.core.profile import PROFILES_DIR as PROFILES
from pipeline.core.profile import TargetProfile, load_profile, shipped_profiles


def test_shipped_profiles_load_and_are_documented():
    names = {load_profile(p).name for p in shipped_profiles()}
    assert {"cpu", "jetson", "gpu-trt"} <= names
    for path in shipped_profiles():
        profile = load_profile(path)
        assert profile.description
        assert profile.measure.repeats >= 30


def test_cpu_profile_defaults_to_fast_x86_int8_scheme():
    cpu = load_profile("cpu")
    assert cpu.runtime == "onnxruntime-cpu"
    assert cpu.device == "local"
    assert (cpu.int8.format, cpu.int8.activation_type, cpu.int8.weight_type) == (
        "qdq",
        "uint8",
        "int8",
    )
    assert cpu.int8.per_channel
    assert Precision.INT8 in cpu.precisions


def test_jetson_profile_points_at_an_agent_with_token_from_env():
    jetson = load_profile("jetson")
    assert jetson.runtime == "tensorrt"
    assert jetson.device.token_env == "PIPELINE_DEVICE_TOKEN"
    assert jetson.int8.activation_type == "int8"  # TensorRT needs symmetric Q/DQ


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_the_key_and_the_allowed_keys(tmp_path):
    path = _write(tmp_path, "name: x\nruntime: onnxruntime-cpu\nthreds: 2\n")
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    msg = str(err.value)
    assert "unknown key 'threds'" in msg and "threads" in msg and "\n" not in msg


def test_unknown_nested_key_lists_the_nested_allowed_keys(tmp_path):
    path = _write(tmp_path, "name: x\nruntime: onnxruntime-cpu\nmeasure: {repeat: 40}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'measure.repeat'.*repeats"):
        load_profile(path)


def test_malformed_yaml_reports_the_line(tmp_path):
    path = _write(tmp_path, "name: x\nruntime: [onnxruntime-cpu\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_profile(path)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("budget_ms: 0", "budget_ms"),
        ("budget_ms: -5", "budget_ms"),
        ("measure: {repeats: 10}", "measure.repeats"),
        ("runtime: tvm", "runtime"),
        ("precisions: []", "precisions"),
        ("precisions: [int4]", "precisions"),
        ("min_keep_ratio: 0", "min_keep_ratio"),
    ],
)
def test_invalid_values_are_rejected(tmp_path, body, fragment):
    text = "name: x\nruntime: onnxruntime-cpu\n" + body + "\n"
    if body.startswith("runtime"):
        text = "name: x\n" + body + "\n"
    with pytest.raises(ConfigError, match=fragment):
        load_profile(_write(tmp_path, text))


def test_missing_profile_lists_shipped_names():
    with pytest.raises(ConfigError, match=r"not found.*cpu"):
        load_profile("no-such-profile")


def test_tolerance_follows_the_loosest_precision():
    p = TargetProfile(name="t", runtime="onnxruntime-cpu")
    assert p.tolerance_for({Precision.FP32}) == p.tolerances.fp32
    assert p.tolerance_for({Precision.FP32, Precision.INT8}) == p.tolerances.int8


def test_a_shipped_profile_is_found_by_its_file_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no jetson.yaml here
    assert load_profile("jetson.yaml").name == load_profile("jetson").name
    (tmp_path / "jetson.yaml").write_text((PROFILES / "cpu.yaml").read_text())
    assert load_profile("jetson.yaml").name == "cpu"  # a file in the folder wins
    with pytest.raises(ConfigError, match=r"not found: elsewhere/jetson.yaml.*cpu"):
        load_profile("elsewhere/jetson.yaml")  # a path is a path, never a shipped name


def test_the_input_shape_comes_from_the_model_and_the_profile_is_a_default():
    from pipeline.core.profile import parse_shape, with_input_shape

    cpu = load_profile("cpu")
    assert parse_shape("3x224x224") == (3, 224, 224) == parse_shape("3X224,224")
    shaped = with_input_shape(cpu, (3, 224, 224))
    assert shaped.input.shape == (3, 224, 224) and shaped.input.batch == cpu.input.batch
    assert with_input_shape(cpu, None) is cpu
    for bad in ("224x224", "3x0x4", "threexfour", ""):
        with pytest.raises(ConfigError, match="channels x height x width"):
            parse_shape(bad)
