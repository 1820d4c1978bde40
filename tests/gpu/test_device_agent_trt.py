"""The device agent on a GPU: it builds the TensorRT engine on the device, measures it, hands
back the engine's hash and metadata, serves the engine, and runs inference for the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from device_agent import Agent, small_onnx

from pipeline.core.artifacts import sha256_file
from pipeline.core.profile import TargetProfile
from pipeline.measure.device_protocol import PROFILE_HEADER, SHA256_HEADER, encode_profile
from pipeline.measure.runners import get_runner
from pipeline.measure.runners.remote import RemoteRunner

pytestmark = pytest.mark.gpu
TOKEN_VAR = "PIPELINE_TEST_GPU_AGENT_TOKEN"


def trt_profile(**changes: Any) -> TargetProfile:
    data = {
        "name": "agent-trt",
        "runtime": "tensorrt",
        "input": {"shape": [3, 32, 32], "batch": 1},
        "measure": {"warmup": 5, "repeats": 30},
    }
    return TargetProfile.model_validate({**data, **changes})


def test_the_agent_builds_measures_and_serves_a_tensorrt_engine(
    trt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model = small_onnx(tmp_path / "small.onnx")
    with Agent(tmp_path / "agent") as agent:
        info = httpx.get(f"{agent.url}/info", headers=agent.auth).json()
        assert info["runtimes"]["tensorrt"] is None and info["versions"]["tensorrt"]
        assert info["gpu"] and info["gpu"]["compute_capability"]

        headers = {**agent.auth, PROFILE_HEADER: encode_profile(trt_profile())}
        response = httpx.post(
            f"{agent.url}/measure", content=model.read_bytes(), headers=headers, timeout=600
        )
        assert response.status_code == 200, response.text
        record = response.json()
        assert record["stats"]["median_ms"] > 0 and record["engine_sha256"]
        assert record["engine_metadata"] is not None
        download = httpx.get(f"{agent.url}/artifacts/{record['job_id']}", headers=agent.auth)
        assert download.headers[SHA256_HEADER] == record["engine_sha256"]
        saved = tmp_path / "device.engine"
        saved.write_bytes(download.content)
        assert sha256_file(saved) == record["engine_sha256"]

        monkeypatch.setenv(TOKEN_VAR, agent.token)
        remote = trt_profile(device={"url": agent.url, "token_env": TOKEN_VAR, "retries": 0})
        feed = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
        runner = get_runner(remote, model)
        assert isinstance(runner, RemoteRunner)
        with runner:
            stats = runner.measure()
            logits = runner.infer(feed)
        assert stats.repeats == 30 and runner.last_result["engine_sha256"]
        with get_runner(trt_profile(runtime="onnxruntime-cpu"), model) as cpu:
            expected = cpu.infer(feed)
        np.testing.assert_allclose(logits, expected, rtol=1e-2, atol=1e-2)
