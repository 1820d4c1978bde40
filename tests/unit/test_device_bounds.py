"""Numbers a request brings to the agent have upper bounds, against a real agent on 127.0.0.1.

Each case goes to `POST /models` (stored, never run), so a number the agent wrongly accepted
costs nothing here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from device_agent import Agent, small_onnx

from pipeline.core.errors import ConfigError
from pipeline.core.profile import RemoteDevice, TargetProfile
from pipeline.measure.device_client import DeviceClient
from pipeline.measure.device_protocol import PROFILE_HEADER

TOKEN_VAR = "PIPELINE_TEST_BOUNDS_TOKEN"
BASE: dict[str, Any] = {
    "name": "tiny",
    "runtime": "onnxruntime-cpu",
    "input": {"shape": [3, 32, 32], "batch": 1},
    "measure": {"warmup": 2, "repeats": 30},
}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with Agent(tmp_path_factory.mktemp("agent-bounds")) as running:
        yield running


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_onnx(tmp_path_factory.mktemp("bounds-model") / "small.onnx")


def header(**changes: Any) -> str:
    """The profile header of BASE with `changes` (section.key=value, as keyword `section__key`)."""
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        *sections, last = key.split("__")
        target = data
        for section in sections:
            target = target.setdefault(section, {})
        target[last] = value
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


CASES = [
    ({"threads": 100_000}, "threads = 100000", "[1, 256]"),
    ({"threads": "100000"}, "threads = '100000'", "[1, 256]"),
    ({"threads": 0}, "threads = 0", "[1, 256]"),
    ({"measure__repeats": 10_000_000}, "measure.repeats", "[30, 1000000]"),
    ({"measure__warmup": 1e9}, "measure.warmup", "[1, 10000]"),
    ({"measure__rounds": 10**6}, "measure.rounds", "[1, 100]"),
    ({"input__batch": 100_000}, "input.batch", "[1, 4096]"),
    ({"input__shape": [3, 100_000, 32]}, "input.shape[1]", "[1, 16384]"),
    ({"input__shape": [3, 16_384, 16_384]}, "elements", "268435456"),
    ({"description": "x" * 20_000}, "characters", "16384"),
]


@pytest.mark.parametrize(("changes", "field", "limit"), CASES)
def test_numbers_beyond_the_agents_limits_are_refused_in_one_line(
    agent: Agent, model: Path, changes: dict[str, Any], field: str, limit: str
):
    before = agent.job_dirs()
    response = httpx.post(
        f"{agent.url}/models",
        content=model.read_bytes(),
        headers={**agent.auth, PROFILE_HEADER: header(**changes)},
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert field in detail and limit in detail and "\n" not in detail, detail
    assert agent.job_dirs() == before  # refused before any folder was made


def test_numbers_within_the_limits_are_taken(agent: Agent, model: Path):
    for changes in ({"threads": 256}, {"measure__repeats": 1_000_000}, {"input__batch": 4096}):
        response = httpx.post(
            f"{agent.url}/models",
            content=model.read_bytes(),
            headers={**agent.auth, PROFILE_HEADER: header(**changes)},
        )
        assert response.status_code == 200, response.text


def test_the_client_reports_a_refused_number_as_a_config_error(
    agent: Agent, model: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(TOKEN_VAR, agent.token)
    device = RemoteDevice(url=agent.url, token_env=TOKEN_VAR, retries=0)
    profile = TargetProfile.model_validate({**BASE, "device": device.model_dump()})
    # model_copy skips validation: what a profile from elsewhere could carry.
    greedy = profile.model_copy(update={"threads": 100_000})
    with DeviceClient(device) as client, pytest.raises(ConfigError) as refused:
        client.upload(model, greedy)
    message = str(refused.value)
    assert "threads" in message and "256" in message and "\n" not in message
