"""RemoteRunner and its client against a real agent on 127.0.0.1: the runner interface, the
token from the environment, retries against a device that is down, and the cache key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from device_agent import Agent, free_port, small_onnx

from pipeline.core.artifacts import sha256_file
from pipeline.core.errors import ConfigError, MeasurementError, RuntimeNotAvailable
from pipeline.core.policy import Precision, uniform_policy
from pipeline.core.profile import TargetProfile
from pipeline.measure import device_client
from pipeline.measure.runners import LatencyStats, check_runtime, get_runner
from pipeline.measure.runners.remote import RemoteRunner

TOKEN_VAR = "PIPELINE_TEST_REMOTE_TOKEN"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    with Agent(tmp_path_factory.mktemp("agent-remote")) as running:
        yield running


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_onnx(tmp_path_factory.mktemp("remote-model") / "small.onnx")


def remote_profile(url: str, retries: int = 1, token_env: str = TOKEN_VAR) -> TargetProfile:
    return TargetProfile.model_validate(
        {
            "name": "remote",
            "runtime": "onnxruntime-cpu",
            "device": {"url": url, "token_env": token_env, "timeout_s": 60, "retries": retries},
            "input": {"shape": [3, 32, 32], "batch": 1},
            "measure": {"warmup": 2, "repeats": 30},
        }
    )


def test_a_missing_token_variable_is_a_one_line_config_error(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(TOKEN_VAR, raising=False)
    with pytest.raises(ConfigError) as err:
        check_runtime(remote_profile(agent.url))
    message = str(err.value)
    assert f"${TOKEN_VAR}" in message and agent.url in message and "\n" not in message


def test_a_wrong_token_is_a_config_error(agent: Agent, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(TOKEN_VAR, "not-the-token-" + "x" * 20)
    with pytest.raises(ConfigError, match="refused the token"):
        check_runtime(remote_profile(agent.url))


def test_the_remote_runner_measures_and_infers_on_the_agent(
    agent: Agent, model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    import onnxruntime as ort

    monkeypatch.setenv(TOKEN_VAR, agent.token)
    profile = remote_profile(agent.url)
    assert check_runtime(profile) is RemoteRunner
    runner = get_runner(profile, model)
    assert isinstance(runner, RemoteRunner)
    feed = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with runner:
        stats = runner.measure(warmup=1, repeats=40)
        logits = runner.infer(feed)
    assert isinstance(stats, LatencyStats) and stats.repeats == 40 and stats.warmup == 1
    assert 0 < stats.min_ms <= stats.median_ms <= stats.max_ms
    record = runner.last_result
    assert record["sha256"] == sha256_file(model) and record["engine_sha256"] is None
    assert record["health"]["before"]["load_avg"] is not None
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: feed})
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    with device_client.DeviceClient(profile.device) as client:
        saved = client.download(record["job_id"], tmp_path / "measured.onnx")
    assert saved.read_bytes() == model.read_bytes()  # no engine for ONNX Runtime: the graph


def test_a_runtime_the_agent_cannot_run_fails_fast(agent: Agent, monkeypatch: pytest.MonkeyPatch):
    from pipeline.measure.runners import runner_class

    try:
        runner_class("tensorrt")
        pytest.skip("TensorRT runs on this machine, so the agent here can run it")
    except RuntimeNotAvailable:
        pass
    monkeypatch.setenv(TOKEN_VAR, agent.token)
    profile = remote_profile(agent.url).model_copy(update={"runtime": "tensorrt"})
    with pytest.raises(RuntimeNotAvailable) as err:
        check_runtime(profile)
    message = str(err.value)
    assert agent.url in message and "cannot run runtime 'tensorrt'" in message
    reason = device_client.device_info(profile)["runtimes"]["tensorrt"]
    assert reason and message.endswith(reason) and "\n" not in message


def test_a_device_that_stays_down_fails_with_its_url(model: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(TOKEN_VAR, "some-token-" + "x" * 20)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    profile = remote_profile(url, retries=2)
    with (
        device_client.DeviceClient(profile.device) as client,
        pytest.raises(MeasurementError) as err,
    ):
        client.measure(model, profile)
    message = str(err.value)
    assert url in message and "unreachable after 3 attempt(s)" in message
    assert "pipeline device serve" in message
    with pytest.raises(RuntimeNotAvailable, match=url):
        check_runtime(profile)  # `pipeline run` fails before any training


def test_the_cache_key_holds_the_device_identity(
    agent: Agent, monkeypatch: pytest.MonkeyPatch, tiny_resnet
):
    import onnxruntime as ort

    from pipeline.search.measurements import candidate_key

    monkeypatch.setenv(TOKEN_VAR, agent.token)
    profile = remote_profile(agent.url)
    identity = device_client.device_identity(profile)
    assert identity["versions"]["onnxruntime"] == ort.__version__
    assert identity["device"] and "gpu" in identity and "power_mode" in identity
    assert (
        device_client.device_identity(
            remote_profile(agent.url).model_copy(update={"device": "local"})
        )
        == {}
    )

    policy = uniform_policy(tiny_resnet, 1.0, Precision.FP32)
    key = candidate_key(tiny_resnet, policy, profile)
    assert key == candidate_key(tiny_resnet, policy, profile)  # stable for one device
    # The same profile answered by another kind of board must not share measurements.
    info_key = (agent.url, agent.token)
    info = device_client._INFO[info_key]
    monkeypatch.setitem(device_client._INFO, info_key, {**info, "device": "another board"})
    assert candidate_key(tiny_resnet, policy, profile) != key


@pytest.mark.parametrize("name", ["jetson", "jetson-agx-orin"])
def test_shipped_jetson_profiles_measure_on_an_agent_over_tls(name: str):
    from pipeline.core.profile import RemoteDevice, load_profile

    profile = load_profile(name)
    assert isinstance(profile.device, RemoteDevice)
    assert profile.device.url.startswith("https://") and profile.device.token_env
    assert profile.runtime == "tensorrt" and profile.channel_multiple == 8
    assert {p.value for p in profile.precisions} == {"int8", "fp16", "fp32"}
    assert profile.int8.activation_type == "int8"  # TensorRT takes symmetric S8S8 Q/DQ only
    assert profile.peaks.gflops and profile.peaks.bandwidth_gbs
