"""`pipeline run` and `pipeline bench` measuring on a device agent (a real one on 127.0.0.1):
a whole run, latency that agrees with a local measurement, and an agent killed mid-job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli as cli
from device_agent import TESTS_DIR, TOKEN_ENV, Agent, profile_yaml
from rich.console import Console

from pipeline.core.profile import load_profile
from pipeline.measure.bench import bench_artifact, format_bench_run

pytestmark = pytest.mark.e2e
RUN_FILES = {"original.onnx", "model.onnx", "validation.json", "report.json", "manifest.json"}


def run_args(*extra: str) -> list[str]:
    return [
        "run",
        "--target",
        "remote.yaml",
        "--model",
        "conftest:make_tiny_resnet",  # untrained, seeded: the run's stages are what is tested
        "--random-init",
        "--policy",
        "uniform:0.5",
        "--finetune-steps",
        "3",
        "--out",
        "runs",
        "--no-progress",
        *extra,
    ]


def setup_workdir(workdir: Path, agent: Agent, **profile) -> Path:
    workdir.mkdir()
    (workdir / "remote.yaml").write_text(profile_yaml(agent, **profile))
    return workdir


def only_run_dir(workdir: Path) -> Path:
    (run_dir,) = list((workdir / "runs").iterdir())
    return run_dir


def test_a_run_measured_on_the_agent(tmp_path, monkeypatch):
    with Agent(tmp_path / "agent") as agent:
        monkeypatch.setenv(TOKEN_ENV, agent.token)
        workdir = setup_workdir(tmp_path / "work", agent)
        result = cli(*run_args(), cwd=workdir)
        # 0: deployable, 1: an untrained model may miss the accuracy gate; both finish the run
        assert result.returncode in (0, 1), result.stdout + result.stderr
        run_dir = only_run_dir(workdir)
        assert {p.name for p in run_dir.iterdir()} >= RUN_FILES
        report = json.loads((run_dir / "report.json").read_text())
        # The logits computed on the device match the PyTorch model the graph came from.
        fidelity = json.loads((run_dir / "validation.json").read_text())["fidelity"]
        assert fidelity["max_abs_error"] < 1e-3 and not fidelity["nan_or_inf"]
        for side in ("original", "deployed"):
            assert report[side]["latency_ms"]["median"] > 0
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert manifest["profile"]["device"]["url"] == agent.url

        # The agent did the work: measured both models, and ran them for validation.
        records = [json.loads(p.read_text()) for p in agent.work_dir.glob("*/result.json")]
        assert len(records) >= 2 and all(r["status"] == "ok" for r in records)
        assert any(not (job / "result.json").exists() for job in agent.job_dirs())

        # `pipeline bench RUN_DIR` on the agent: both models, one runner, the speedup.
        bench = cli("bench", "--target", "remote.yaml", str(run_dir), "--json", cwd=workdir)
        assert bench.returncode == 0, bench.stderr
        pair = json.loads(bench.stdout)
        ratio = pair["original"]["latency_ms"]["median"] / pair["deployed"]["latency_ms"]["median"]
        assert pair["speedup"] == pytest.approx(ratio)
        console = Console(record=True, width=100)
        console.print(format_bench_run(pair))
        assert "speedup" in console.export_text()

        assert_remote_latency_agrees_with_local(workdir / "remote.yaml", run_dir / "original.onnx")


def assert_remote_latency_agrees_with_local(profile_path: Path, model: Path) -> None:
    """The agent times each inference in its job process, as this machine does (HTTP is not
    in its figure): the same timed runs, the same statistics. How close the two medians come
    depends on how busy the machine is, so that is a benchmark's figure, not this test's."""
    remote = load_profile(profile_path)
    spec = remote.measure.model_copy(update={"warmup": 20, "repeats": 200})
    remote = remote.model_copy(update={"measure": spec})
    local = remote.model_copy(update={"device": "local"})
    sides = {name: bench_artifact(p, model) for name, p in (("local", local), ("remote", remote))}
    assert sides["remote"]["repeats"] == sides["local"]["repeats"] == 200
    assert set(sides["remote"]["latency_ms"]) == set(sides["local"]["latency_ms"])
    for side in sides.values():
        lat = side["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"], side


def test_an_agent_killed_mid_job_fails_the_run_and_resume_completes_it(tmp_path, monkeypatch):
    first = Agent(tmp_path / "agent1").start()
    try:
        monkeypatch.setenv(TOKEN_ENV, first.token)
        # Enough timed runs that the measurement is still going when the agent dies.
        workdir = setup_workdir(tmp_path / "work", first, retries=2, repeats=1000)
        env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *run_args()],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for_a_queued_job(first, proc)
            first.kill()
            _, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
    finally:
        first.stop()
    # MeasurementError: the CLI says "measurement failed", one line, naming the device.
    assert proc.returncode == 1, stderr
    error = stderr.strip().splitlines()[-1]
    assert "measurement failed" in error and first.url in error and "unreachable" in error
    assert "Traceback" not in stderr
    run_dir = only_run_dir(workdir)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"

    with Agent(tmp_path / "agent2", port=first.port, token=first.token):
        result = cli("run", "--target", "remote.yaml", "--resume", str(run_dir), cwd=workdir)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["deployed"]["latency_ms"]["median"] > 0


def wait_for_a_queued_job(agent: Agent, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until a measurement's upload is complete (profile.json is written right after it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(agent.work_dir.glob("*/profile.json")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before measuring: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("the run never sent a measurement to the agent")
