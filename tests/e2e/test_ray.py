"""Searches on a local Ray cluster of 2 CPUs: end to end through the CLI with two workers and two
device agents, a worker killed mid-search, the same results as a local search, and the one-line
error where Ray is missing."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import Collect, make_tiny_evaluator
from conftest import run_cli as cli
from device_agent import TESTS_DIR, TOKEN_ENV, Agent

from agents.decore import DecoreAgent
from agents.rewards import budget_reward
from pipeline.search import run_search
from pipeline.search.parallel import ParallelConfig, parallel_evaluator

# One worker runs every test of a local Ray cluster: two clusters at once would share 2 cores
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray")]
TOKEN = "ray-fleet-token-" + "x" * 24

PROFILE = """
name: fleet
description: two identical CPU devices behind agents, for tests
runtime: onnxruntime-cpu
devices:
  - {{url: "{first}", token_env: {token_env}, timeout_s: 120, retries: 1}}
  - {{url: "{second}", token_env: {token_env}, timeout_s: 120, retries: 1}}
precisions: [int8, fp32]
input: {{shape: [3, 32, 32], batch: 1}}
threads: 1
channel_multiple: 8
min_keep_ratio: 0.25
max_accuracy_drop: 0.5
measure: {{warmup: 3, repeats: 30, rounds: 1}}
"""

CONFIG = """
model: conftest:make_tiny_resnet
random_init: true
out: runs
show_progress: false
finetune: {steps: 10, qat: never}
search:
  agent: random
  episodes: 4
  candidate_steps: 3
  checkpoint_every: 1
  baselines: false
  allow_over_budget: true
  parallel: {backend: ray, address: auto, workers: 2}
"""


@pytest.fixture
def one_thread():
    """Each Ray worker fine-tunes on its 1 CPU; a local search compared with it does too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def episodes_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]


def test_a_search_on_ray_with_two_workers_and_two_devices(ray_cluster, tmp_path, monkeypatch):
    """`pipeline run` joins the running cluster (`address: auto`), evaluates candidates on two
    workers and measures them on two device agents, and ships as a local search does."""
    root = tmp_path / "agents"
    with Agent(root / "a", token=TOKEN) as first, Agent(root / "b", token=TOKEN) as second:
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        work = tmp_path / "work"
        work.mkdir()
        profile = PROFILE.format(first=first.url, second=second.url, token_env=TOKEN_ENV)
        (work / "fleet.yaml").write_text(profile)
        (work / "pipeline.yaml").write_text(CONFIG)
        result = cli("run", "--target", "fleet.yaml", "--config", "pipeline.yaml", cwd=work)
        jobs = {
            agent.url: len(list(agent.work_dir.glob("*/result.json"))) for agent in (first, second)
        }
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr
    (run_dir,) = list((work / "runs").iterdir())
    assert (run_dir / "report.json").is_file(), result.stdout[-3000:] + result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    search = report["search"]
    assert search["episodes"] == 4 and search["failed_candidates"] == 0
    assert [r["episode"] for r in episodes_of(run_dir)] == [0, 1, 2, 3]
    parallel = search["parallel"]
    assert (parallel["backend"], parallel["workers"], parallel["address"]) == ("ray", 2, "auto")
    assert parallel["retried_candidates"] == 0 and parallel["gpus_per_worker"] == 0
    # Every real measurement of a candidate went through the fleet, both devices took some.
    fleet_jobs = parallel["devices"]["jobs"]
    assert sum(fleet_jobs.values()) == search["real_measurements"] >= 2
    assert all(fleet_jobs.values()) and all(jobs.values())
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    assert report["deployed"]["latency_ms"]["median"] > 0


def test_a_worker_killed_mid_search_is_retried_and_results_match_a_local_search(
    ray_cluster, one_thread, tiny_resnet, digits_splits, tiny_profile, tmp_path
):
    """Local and Ray searches with the same seed and worker count evaluate the same candidates
    with the same accuracies, even when a Ray worker is killed mid-search: its candidate is
    retried on a worker that is up, and every episode is logged in order."""
    local_base = make_tiny_evaluator(tiny_resnet, digits_splits, tiny_profile, tmp_path / "local")
    local = parallel_evaluator(local_base, ParallelConfig(workers=2))
    local_run = search(local, tmp_path / "local")

    base = make_tiny_evaluator(tiny_resnet, digits_splits, tiny_profile, tmp_path / "ray")
    remote = parallel_evaluator(base, ParallelConfig(backend="ray", workers=2))
    try:
        started_pids = remote.worker_pids()
        killed: list[int] = []
        killer = threading.Thread(
            target=kill_a_busy_worker, args=(remote, tmp_path / "ray", killed)
        )
        killer.start()
        ray_run = search(remote, tmp_path / "ray")
        killer.join()
        assert killed and killed[0] in started_pids
        assert remote.retries >= 1 and killed[0] not in remote.worker_pids()  # replaced
        assert remote.describe()["retried_candidates"] == remote.retries

        records = episodes_of(tmp_path / "ray")
        assert [r["episode"] for r in records] == list(range(4))
        assert all(r["error"] is None for r in records)
        for ours, theirs in zip(records, episodes_of(tmp_path / "local"), strict=True):
            assert ours["policy"] == theirs["policy"]
            assert ours["accuracy"] == theirs["accuracy"]
            assert ours["source"] == theirs["source"]
        assert (ray_run.real_measurements, ray_run.cached_measurements) == (
            local_run.real_measurements,
            local_run.cached_measurements,
        )

        # DECORE learns from each batch's results: the same on both, batch after batch (a
        # budget no candidate misses keeps the measured latencies' noise out of its lambda).
        decore = [decore_search(evaluator) for evaluator in (local, remote)]
        assert [r.policy for r in decore[0]] == [r.policy for r in decore[1]]
        assert [r.accuracy for r in decore[0]] == [r.accuracy for r in decore[1]]
    finally:
        remote.close()
        local.close()


def search(evaluator, run_dir: Path):
    return run_search(
        evaluator,
        agent_name="random",
        reward_name="budget",
        episodes=4,
        run_dir=run_dir,
        seed=0,
        checkpoint_every=1,
        show_progress=False,
    )


def decore_search(evaluator) -> list:
    evaluator.use_space(dataclasses.replace(evaluator.space, budget_ms=1e6))
    agent = DecoreAgent(evaluator, budget_reward, seed=0, steps_per_episode=2, init_logit=0.0)
    collect = Collect()
    agent.search(4, collect)
    assert all(r.ok for r in collect.results), [r.error for r in collect.results]
    return collect.results


def kill_a_busy_worker(evaluator, run_dir: Path, killed: list[int]) -> None:
    """SIGKILL a worker busy with a candidate, once the first episode is logged."""
    log = run_dir / "episodes.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        busy = evaluator.busy_pids()
        if busy and log.is_file() and log.read_text().strip():
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])
            return
        time.sleep(0.02)


def test_without_ray_the_ray_backend_exits_2_in_one_line(tmp_path):
    # A `ray` that fails to import, first on the path: as on a machine without Ray.
    blocker = tmp_path / "no-ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    (tmp_path / "pipeline.yaml").write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{TESTS_DIR}"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--target",
            "cpu",
            "--config",
            "pipeline.yaml",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "search.parallel" in lines[0] and "pip install '.[ray]'" in lines[0]
    assert not (tmp_path / "runs").exists()  # refused before any work
