"""search.parallel: the config, Ray as an optional dependency, profiles with several devices, the
device fleet (real agents on 127.0.0.1 behind real Ray actors) and SB3 agents stepping several
environments together."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Collect, make_tiny_evaluator
from device_agent import Agent, free_port, small_onnx

from pipeline.core.config import RunConfig
from pipeline.core.errors import ConfigError, MeasurementError
from pipeline.core.profile import TargetProfile
from pipeline.core.schema import parse_model
from pipeline.search.parallel import ParallelConfig, parallel_evaluator

# One worker runs every test of a local Ray cluster: two clusters at once would share 2 cores
pytestmark = pytest.mark.xdist_group("ray")

TOKEN_VAR = "PIPELINE_TEST_FLEET_TOKEN"
TOKEN = "fleet-token-" + "x" * 24


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory):
    """Two identical device agents (one token for both)."""
    root = tmp_path_factory.mktemp("fleet")
    first, second = Agent(root / "a", token=TOKEN), Agent(root / "b", token=TOKEN)
    with first, second:
        yield first, second


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return small_onnx(tmp_path_factory.mktemp("fleet-model") / "small.onnx").read_bytes()


def fleet_profile(*urls: str, repeats: int = 60) -> TargetProfile:
    device = {"token_env": TOKEN_VAR, "timeout_s": 60, "retries": 1}
    return TargetProfile.model_validate(
        {
            "name": "fleet",
            "runtime": "onnxruntime-cpu",
            "devices": [{"url": url, **device} for url in urls],
            "input": {"shape": [3, 32, 32], "batch": 1},
            "measure": {"warmup": 2, "repeats": repeats},
        }
    )


# ----------------------------------------------------------------------------------- config


def test_the_parallel_config_is_local_one_worker_by_default_and_strict() -> None:
    config = parse_model(RunConfig, {}, "pipeline.yaml").search.parallel
    assert (config.backend, config.address, config.workers) == ("local", None, 1)
    with pytest.raises(ConfigError, match="address is only used with backend: ray"):
        parse_model(RunConfig, {"search": {"parallel": {"address": "auto"}}}, "pipeline.yaml")
    with pytest.raises(ConfigError, match=r"search\.parallel\.workers"):
        parse_model(RunConfig, {"search": {"parallel": {"workers": 0}}}, "pipeline.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'search\.parallel\.nodes'"):
        parse_model(RunConfig, {"search": {"parallel": {"nodes": 2}}}, "pipeline.yaml")


def test_the_local_backend_leaves_the_evaluator_as_it_is_and_never_imports_ray() -> None:
    evaluator = object()
    assert parallel_evaluator(evaluator, ParallelConfig()) is evaluator
    code = (
        "import sys, agents.sb3_agents, agents.sb3_ppo, pipeline.run, pipeline.run.search_stage\n"
        "from pipeline.search.parallel import ParallelConfig, parallel_evaluator\n"
        "parallel_evaluator(object(), ParallelConfig(workers=2))\n"
        "print('ray' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_without_ray_the_ray_backend_is_a_one_line_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    data = {"search": {"parallel": {"backend": "ray", "workers": 2}}}
    with pytest.raises(ConfigError) as err:
        parse_model(RunConfig, data, "pipeline.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("pipeline.yaml: search.parallel")
    assert "pip install '.[ray]'" in message and err.value.exit_code == 2
    with pytest.raises(ConfigError, match=r"needs Ray"):
        parallel_evaluator(object(), ParallelConfig.model_construct(backend="ray", workers=2))


def test_a_cluster_address_where_nothing_answers_fails_at_once() -> None:
    # In a process of its own: Ray may only be joined once per process.
    code = (
        "from pipeline.search.parallel import ParallelConfig\n"
        "from pipeline.search.parallel.cluster import connect\n"
        f"connect(ParallelConfig(backend='ray', address='127.0.0.1:{free_port()}'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    last = result.stderr.strip().splitlines()[-1]
    assert "ConfigError: search.parallel.address '127.0.0.1:" in last
    assert "nothing answers there" in last and "ray start --head" in last


def test_each_worker_requests_its_share_of_the_gpus() -> None:
    from pipeline.search.parallel.cluster import gpu_share

    assert gpu_share(0, 2) == 0.0  # a CPU cluster: fine-tunes stay on the CPU
    assert (gpu_share(1, 2), gpu_share(2, 3), gpu_share(8, 2)) == (0.5, 0.66, 1.0)


def test_a_proxy_reads_and_writes_through_to_the_evaluator() -> None:
    from types import SimpleNamespace

    base = SimpleNamespace(space="space", real_measurements=3, close=lambda: "closed")
    proxy = parallel_evaluator(base, ParallelConfig(workers=3))
    assert proxy.workers == 3 and proxy.space == "space" and proxy.close() == "closed"
    proxy.space, proxy.real_measurements = "new space", 5  # a budget set, counters restored
    assert (base.space, base.real_measurements) == ("new space", 5)
    assert proxy.describe() == {"backend": "local", "workers": 3}


def test_worker_state_is_merged_in_submission_order() -> None:
    from pipeline.search.parallel.evaluator import merge_state

    sent = {"best": None, "seen": 4, "model": {"ys": [1.0], "errors": []}, "mode": "a"}
    one = {"best": 0.8, "seen": 5, "model": {"ys": [1.0, 2.0], "errors": [0.1]}, "mode": "a"}
    two = {"best": 0.6, "seen": 5, "model": {"ys": [1.0, 3.0], "errors": []}, "mode": "b"}
    # One worker: the driver's state becomes exactly the worker's.
    assert merge_state(sent, sent, one) == one
    # Two workers sent the same state: both measurements are kept, in order; the best stays
    # the best; what a worker changed takes its value.
    merged = merge_state(merge_state(sent, sent, one), sent, two)
    assert merged == {
        "best": 0.8,
        "seen": 5,
        "model": {"ys": [1.0, 2.0, 3.0], "errors": [0.1]},
        "mode": "b",
    }


# ---------------------------------------------------------------------------------- profiles


def test_a_profile_lists_several_identical_devices() -> None:
    profile = fleet_profile("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert [d.url for d in profile.fleet] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert profile.device == profile.devices[0]  # what measures one model at a time
    again = TargetProfile.model_validate(profile.model_dump(mode="json"))
    assert again == profile  # a profile as resolved (manifest, measuring child) reads back
    single = fleet_profile("http://127.0.0.1:1").model_copy(update={"devices": []})
    assert single.fleet == [single.device]
    assert TargetProfile(name="here", runtime="onnxruntime-cpu").fleet == []

    data = profile.model_dump(mode="json")
    with pytest.raises(ConfigError, match="more than once"):
        parse_model(TargetProfile, {**data, "devices": [data["devices"][0]] * 2}, "p.yaml")
    with pytest.raises(ConfigError, match="must be the first of `devices`"):
        parse_model(TargetProfile, {**data, "device": data["devices"][1]}, "p.yaml")
    bad = {**data, "device": None, "devices": [{"url": "http://x:1", "adress": "y"}]}
    bad.pop("device")
    with pytest.raises(ConfigError, match=r"unknown key 'devices\.0\.adress'.*token_env"):
        parse_model(TargetProfile, bad, "p.yaml")


# ------------------------------------------------------------------------------------ fleet


def test_measurements_never_overlap_on_a_device(
    ray_cluster, agents, graph: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.search.parallel.fleet import Fleet

    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    fleet = Fleet.start(fleet_profile(*(a.url for a in agents)), timeout_s=60)
    try:
        calls = [fleet.pool.measure.remote(graph) for _ in range(6)]  # all at once
        results = ray_cluster.get(calls)
        status, timelines = fleet.status(), fleet.timelines()
    finally:
        fleet.close()
    assert all(r["latency_ms"]["median"] > 0 for r in results)
    assert sum(status["jobs"].values()) == 6 and all(status["jobs"].values())
    assert status["out_of_rotation"] == {} and status["retried_measurements"] == 0
    for spans in timelines.values():  # the actors' side: one measurement at a time
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    for agent in agents:  # the agents' side: no upload arrives while another job runs
        jobs = sorted(
            (
                (json.loads((d / "result.json").read_text()), (d / "profile.json").stat().st_mtime)
                for d in agent.job_dirs()
                if (d / "result.json").is_file()
            ),
            key=lambda job: job[0]["started"],
        )
        assert jobs
        for (before, _), (_, uploaded) in itertools.pairwise(jobs):
            assert uploaded >= before["finished"]


def test_a_device_that_dies_leaves_the_rotation_and_its_job_is_retried(
    ray_cluster, graph: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.search.parallel.fleet import Fleet, FleetMeasurer

    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    victim, other = (Agent(tmp_path / name, token=TOKEN).start() for name in ("victim", "other"))
    model = tmp_path / "small.onnx"
    model.write_bytes(graph)
    try:
        fleet = Fleet.start(fleet_profile(victim.url, other.url), timeout_s=60)
        try:
            victim.kill()  # after the fleet checked it: it dies between two measurements
            # The pool hands the first job to the victim (listed first), then retries it.
            results = ray_cluster.get([fleet.pool.measure.remote(graph) for _ in range(3)])
            status = fleet.status()
            assert all(r["latency_ms"]["median"] > 0 for r in results)
            assert list(status["out_of_rotation"]) == [victim.url]
            assert status["retried_measurements"] == 1
            assert status["jobs"] == {victim.url: 0, other.url: 3}

            other.kill()  # the last device gone: one line, as a search worker sees it
            with pytest.raises(MeasurementError) as err:
                FleetMeasurer(fleet.pool).measure(model)
        finally:
            fleet.close()
    finally:
        victim.stop()
        other.stop()
    message = str(err.value)
    assert message.startswith("no device of the profile is left") and other.url in message
    assert "\n" not in message


def test_devices_that_are_not_identical_are_refused(
    ray_cluster, agents, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.measure import device_client as client
    from pipeline.search.parallel.fleet import Fleet

    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    first, second = agents
    info = client.device_info(fleet_profile(second.url))
    # The second agent as another kind of board would describe itself.
    monkeypatch.setitem(client._INFO, (second.url, TOKEN), {**info, "device": "another board"})
    with pytest.raises(ConfigError, match="the devices are not identical") as err:
        Fleet.start(fleet_profile(first.url, second.url), timeout_s=60)
    assert second.url in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------ SB3 batches


def test_sb3_agents_step_one_env_per_worker_and_stop_exactly(
    tiny_resnet, digits_splits, tiny_profile, tmp_path
):
    """Two workers: episodes end two at a time and are evaluated together; an odd total still
    gives exactly that many candidates, and the search resumes from a checkpoint. TD3 is the
    off-policy case, which stops inside a round of episodes."""
    from agents import make_agent
    from agents.rewards import budget_reward
    from agents.vec_env import BatchVecEnv

    base = make_tiny_evaluator(tiny_resnet, digits_splits, tiny_profile, tmp_path / "search")
    evaluator = parallel_evaluator(base, ParallelConfig(workers=2))
    agent = make_agent("td3", evaluator, budget_reward, seed=0)
    seen: list[int] = []
    collect = Collect()

    def on_episode(result, reward) -> None:
        seen.append(agent.episodes_done)
        collect(result, reward)

    agent.search(3, on_episode)
    assert seen == [1, 2, 3] and agent.workers == 2
    assert isinstance(agent.env, BatchVecEnv) and agent.env.num_envs == 2
    assert all(r.ok for r in collect.results), [r.error for r in collect.results]
    agent.save(tmp_path / "state")
    resumed = make_agent("td3", evaluator, budget_reward, seed=0)
    resumed.load(tmp_path / "state")
    resumed.search(4, collect)
    assert len(collect.results) == 4 and resumed.episodes_done == 4
    evaluator.close()
