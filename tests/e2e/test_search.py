"""The search end to end through the CLI at a tiny size: every agent, baselines, failures,
and a search killed with SIGKILL then resumed."""

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

from agents import AGENTS
from pipeline.search.confirm import FINALISTS

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"

PROFILE = """
name: tiny
description: tiny CPU target for tests
runtime: onnxruntime-cpu
precisions: [{precisions}]
input: {{shape: [3, 32, 32], batch: 1}}
threads: 1
channel_multiple: 8
min_keep_ratio: 0.25
max_accuracy_drop: 0.1
measure: {{warmup: 3, repeats: 30}}
"""

CONFIG = """
model: conftest:make_tiny_resnet
weights: tiny.safetensors
out: runs
show_progress: false
finetune: {{steps: 10}}
search:
  {{candidate_steps: 3, checkpoint_every: 1, baselines: {baselines}, episodes: {episodes},
   matched_accuracy_steps: 2, descent_groups: 2}}
"""


def setup_dir(tmp_path: Path, model, precisions="int8, fp32", baselines=False, episodes=3) -> Path:
    (tmp_path / "tiny.yaml").write_text(PROFILE.format(precisions=precisions))
    (tmp_path / "pipeline.yaml").write_text(
        CONFIG.format(baselines=str(baselines).lower(), episodes=episodes)
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    return tmp_path


def run_dir_of(workdir: Path) -> Path:
    (run_dir,) = list((workdir / "runs").iterdir())
    return run_dir


def episodes_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("agent", sorted(AGENTS))
def test_every_agent_runs_end_to_end(tmp_path, trained_tiny_resnet, agent):
    workdir = setup_dir(tmp_path, trained_tiny_resnet)
    args = ("--agent", agent, "--allow-over-budget")
    result = cli("run", "--target", "tiny.yaml", "--config", "pipeline.yaml", *args, cwd=workdir)
    assert result.returncode in (0, 1), result.stderr
    run_dir = run_dir_of(workdir)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["search"]["agent"] == agent and report["search"]["episodes"] == 3
    assert len(episodes_of(run_dir)) == 3
    assert {"model.onnx", "policy.json", "validation.json", "pareto.png"} <= {
        p.name for p in run_dir.iterdir()
    }
    search = report["search"]
    counts = sum(search[f"{k}_measurements"] for k in ("real", "cached", "predicted"))
    assert counts == 3 - search["failed_candidates"]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    # The default budget: 0.6 x the original in its fastest precision, measured in this run
    setup = json.loads((run_dir / "search_setup.json").read_text())
    by_precision = setup["precision_latency_ms"]
    fastest = min(by_precision, key=by_precision.get)
    assert setup["budget_ms"] == pytest.approx(0.6 * by_precision[fastest])
    assert f"in {fastest}, its fastest precision" in setup["budget_source"]
    assert report["budget_ms"] == pytest.approx(setup["budget_ms"])
    # judged as that ratio: scaled by the original's latency beside the deployed model
    assert setup["budget_relative"] is True
    drift = report["original"]["latency_ms"]["median"] / setup["original_latency_ms"]
    assert report["budget_ms_at_gate"] == pytest.approx(report["budget_ms"] * drift)
    if (search["shipped"] or "").startswith("best under budget"):  # measured again first
        tries = search["confirmation"]
        assert 1 <= len(tries) <= 3 and all(t["confirmed_ms"] > 0 for t in tries)
        assert all(not t["meets_budget"] for t in tries[:-1])
        # then scaled along its own shape to sit within 0.9 x the budget, as measured
        fill = search["fill"]
        assert fill["target_ms"] == pytest.approx(0.9 * report["budget_ms"])
        assert fill["pick_ms"] in {t["confirmed_ms"] for t in tries}
        if fill["ladder"]:  # read against the original: the budget is a ratio to it
            assert fill["anchor"] == "original" and fill["pick_session_ms"] > 0
        if fill["scale"] is not None:
            assert search["shipped"] == f"best under budget, scaled x{fill['scale']:.2f}"
            assert fill["ms"] <= fill["target_ms"]
            assert (fill["scale"] > 1) == (fill["pick_ms"] < fill["target_ms"])
    if agent in {"ppo", "dqn", "sac", "td3"}:  # SB3's TensorBoard logs land in the run dir
        assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_search_with_baselines_on_the_same_runner(tmp_path, trained_tiny_resnet):
    workdir = setup_dir(tmp_path, trained_tiny_resnet, baselines=True, episodes=4)
    args = ("--agent", "random", "--allow-over-budget")
    result = cli("run", "--target", "tiny.yaml", "--config", "pipeline.yaml", *args, cwd=workdir)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads((run_dir_of(workdir) / "report.json").read_text())
    searched = report["search"]["search_precision"]
    uniforms = {"uniform"} | (set() if searched == "fp32" else {f"uniform_{searched}"})
    # the equal-accuracy bisection runs in the search's precision only (the default)
    at_accuracy = {
        "uniform_at_accuracy" if searched == "fp32" else f"uniform_{searched}_at_accuracy"
    }
    baselines = report["baselines"]
    assert set(baselines) == {"int8", *uniforms, *at_accuracy}
    kept = {p.name for p in (run_dir_of(workdir) / "baselines").iterdir()}
    assert kept == {f"{name}.onnx" for name in baselines}  # to re-measure elsewhere
    uniform = baselines["uniform"]
    assert 0.25 <= uniform["keep_ratio"] <= 1.0 and uniform["latency_ms"]["median"] > 0
    assert baselines["int8"]["params"] == report["original"]["params"]
    deployed = report["deployed"]["accuracy"]
    for name in at_accuracy:  # as accurate as the deployed model, unless even unpruned is not
        side = baselines[name]
        assert side["target_accuracy"] == deployed
        assert (side["accuracy"] >= deployed) == side["reached"], side
        assert 0.25 <= side["keep_ratio"] <= 1.0
        # never less pruned than needed: a baseline already accurate enough at matched
        # latency is only ever pruned further
        matched = baselines[name.removesuffix("_at_accuracy")]
        if matched["accuracy"] >= deployed:
            assert side["keep_ratio"] <= matched["keep_ratio"]
    assert all(side["deployed_speedup"] > 0 for side in baselines.values())
    assert "Baselines" in (run_dir_of(workdir) / "report.md").read_text()


def test_failing_candidates_are_logged_and_the_search_goes_on(tmp_path, trained_tiny_resnet):
    # FragileNet hard-codes conv2's 32 channels in its forward: candidates pruning it fail.
    workdir = setup_dir(tmp_path, trained_tiny_resnet, episodes=4)
    config = (workdir / "pipeline.yaml").read_text()
    config = config.replace("conftest:make_tiny_resnet", "conftest:make_fragile_net")
    # No weights: the untrained net on purpose (its candidates fail before accuracy matters)
    config = config.replace("weights: tiny.safetensors\n", "random_init: true\n")
    (workdir / "pipeline.yaml").write_text(config)
    args = ("--agent", "random", "--allow-over-budget")
    result = cli("run", "--target", "tiny.yaml", "--config", "pipeline.yaml", *args, cwd=workdir)
    records = episodes_of(run_dir_of(workdir))
    assert len(records) == 4
    failed = [r for r in records if r["error"]]
    assert failed and all(r["latency_ms"] is None and r["accuracy"] == 0.0 for r in failed)
    assert all(r["error"].strip() for r in failed)
    assert all(isinstance(r["reward"], float) and r["reward"] == r["reward"] for r in records)
    report = json.loads((run_dir_of(workdir) / "report.json").read_text())
    assert report["search"]["failed_candidates"] == len(failed)
    assert result.returncode in (0, 1)


def test_a_search_killed_with_sigkill_resumes(tmp_path, trained_tiny_resnet):
    workdir = setup_dir(tmp_path, trained_tiny_resnet, episodes=8)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    args = [
        "run",
        "--target",
        "tiny.yaml",
        "--config",
        "pipeline.yaml",
        "--agent",
        "random",
        "--allow-over-budget",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            log = list(workdir.glob("runs/*/episodes.jsonl"))
            if log and len(log[0].read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    run_dir = run_dir_of(workdir)
    assert not (run_dir / "report.json").exists()
    done_before = len(episodes_of(run_dir))
    assert 3 <= done_before < 8

    result = cli("run", "--target", "tiny.yaml", "--resume", str(run_dir), cwd=workdir)
    assert result.returncode in (0, 1), result.stderr
    records = episodes_of(run_dir)
    assert [r["episode"] for r in records] == list(range(8))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["search"]["episodes"] == 8
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"


def test_the_cpu_profile_never_ships_precisions_slower_than_fp32(tmp_path, trained_tiny_resnet):
    """A search on the shipped CPU profile: the searched precisions are measured against the
    same pruned model in FP32 on the same runner, and the slower of the two is never what
    ships. (The tiny model at 32x32 stands in for the demo's, whose baseline takes minutes.)"""
    workdir = setup_dir(tmp_path, trained_tiny_resnet)
    profile = str(ROOT / "profiles" / "cpu.yaml")
    args = ("--config", "pipeline.yaml", "--input-shape", "3x32x32", "--allow-over-budget")
    result = cli("run", "--target", profile, *args, cwd=workdir)
    assert result.returncode in (0, 1), result.stderr
    run_dir = run_dir_of(tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    shipped = {a["precision"] for a in json.loads((run_dir / "policy.json").read_text())["layers"]
               .values()}  # fmt: skip
    check = report["precision_check"]
    if check is None:  # the search chose FP32 everywhere: nothing to compare
        assert shipped == {"fp32"}
        return
    faster = check["policy_ms"]["median"] <= check["fp32_ms"]["median"]
    assert check["not_slower"] == faster
    if check["shipped"] == "fp32":
        assert not faster and shipped == {"fp32"}
    else:
        assert faster and shipped != {"fp32"}


@pytest.mark.parametrize(("agent", "drop"), [("uniform", 3), ("ppo", 3), ("uniform", 40)])
def test_the_accuracy_floor_objective_ships_the_fastest_within_it(
    tmp_path, trained_tiny_resnet, agent, drop
):
    """`--max-accuracy-drop` alone: no budget, the fastest candidate holding the floor, checked
    again once built in full, then stepped down; the run's floor is the test gate's. (The tiny
    candidates' short fine-tune holds a 3-point floor rarely, a 40-point one always.)"""
    workdir = setup_dir(tmp_path, trained_tiny_resnet, episodes=4)
    args = ("--agent", agent, "--max-accuracy-drop", str(drop))
    result = cli("run", "--target", "tiny.yaml", "--config", "pipeline.yaml", *args, cwd=workdir)
    run_dir = run_dir_of(workdir)
    report = json.loads((run_dir / "report.json").read_text())
    search = report["search"]
    assert search["objective"] == "floor" and report["budget_ms"] is None, result.stderr
    assert report["met_budget"] is None
    ran = [r for r in episodes_of(run_dir) if r["error"] is None]
    # candidates hold the shipped floor less what the full recovery added to one probe
    probe = search["recovery_allowance"]
    gain = probe["full_recovery_score"] - probe["candidate_score"]
    assert probe["allowance"] == pytest.approx(min(max(gain, 0.0), 2 * drop / 100))
    assert search["score_floor"] == pytest.approx(search["accuracy_floor"] - probe["allowance"])
    held = [r for r in ran if r["accuracy"] >= search["score_floor"] - 1e-9]
    assert all(r["holds_floor"] == (r in held) for r in ran)
    if held:  # the pick is the fastest that held the floor, then checked once built
        assert report["max_accuracy_drop"] == pytest.approx(drop / 100)
        assert search["shipped"] == "best within the floor"
        # the fastest few were measured again side by side; their latencies decide
        policies = {r["episode"]: str(r["policy"]) for r in held}
        finalists = search.get("finalists", [])
        ranked = {policies[r["episode"]]: r["session_ms"] for r in finalists}
        distinct = set(policies.values())
        assert len(ranked) == len(finalists)  # one per policy
        assert len(ranked) == (min(len(distinct), FINALISTS) if len(distinct) > 1 else 0)

        def ms(r: dict) -> float:
            return ranked.get(str(r["policy"]), r["latency_ms"])

        first = search["floor_tries"][0]["episode"]
        assert first == min(held, key=lambda r: (ms(r), -r["accuracy"]))["episode"]
        assert 1 <= len(search["floor_tries"]) <= 3
        tries = search["floor_tries"]
        if tries[-1]["holds_floor"]:
            _check_descent(search, run_dir)
        else:  # no try held: the one closest to the floor on validation ships
            closest = max(tries, key=lambda t: t["val_accuracy"] - t["margin"])["episode"]
            assert search["best_episode"] == closest
            shipped = next(r for r in ran if r["episode"] == closest)["policy"]
            assert json.loads((run_dir / "policy.json").read_text()) == shipped
        drop_gate = [f for f in report["gates"]["failed"] if "accuracy drop" in f]
        assert bool(drop_gate) == (report["accuracy_drop"] > drop / 100)
        assert result.returncode == (0 if report["gates"]["passed"] else 1)
    else:  # nothing held it: a plain verdict and nothing shipped
        assert result.returncode == 1 and "accuracy floor" in report["message"]


def _check_descent(search: dict, run_dir) -> None:
    """The held pick is stepped down by bisection over a ladder of scales of its keep ratios,
    each run of layers weighted by what shrinking it alone measured to save; only rungs
    measured faster than every wider one are tried; a step holds by a margin for the test set;
    the deepest rung that held ships."""
    descent, floor = search["descent"], search["accuracy_floor"]
    ladder = descent["ladder"]
    assert [r["scale"] for r in ladder] == pytest.approx([0.95 - 0.05 * i for i in range(12)])
    best = 1.0
    for rung in ladder:
        assert rung["kept"] == (rung["ratio"] <= best * 0.98)
        best = rung["ratio"] if rung["kept"] else best
    rungs = [r for r in ladder if r["kept"]]
    low, high = -1, len(rungs)
    for step in descent["steps"]:  # a bisection over the kept rungs' indices
        middle = (low + high) // 2
        assert step["scale"] == rungs[middle]["scale"]
        assert step["ratio_to_pick"] == rungs[middle]["ratio"]
        low, high = (middle, high) if step["holds_floor"] else (low, middle)
    assert len(descent["steps"]) == 4 or high - low <= 1  # 4 steps, or nothing left between
    runs = descent["direction"]  # descent_groups: 2 in this config
    assert len(runs) == 2 and all(r["factor"] == 0.7 and r["layers"] for r in runs)
    if max(r["saving"] for r in runs) > 0:
        assert max(r["weight"] for r in runs) == 1.0
        assert all(0.0 <= r["weight"] <= 1.0 for r in runs)
    for step in descent["steps"]:
        assert step["margin"] >= step["standard_error"]  # validation's and the test set's
        assert step["holds_floor"] == (step["val_accuracy"] - step["margin"] >= floor - 1e-12)
    if not any(s["holds_floor"] for s in descent["steps"]):
        assert descent["shipped"] == "pick" and descent["speedup_over_pick"] is None
        return
    assert descent["shipped"] == "descended"
    shipped = descent["steps"][descent["shipped_step"] - 1]
    assert shipped["holds_floor"] and shipped["scale"] == rungs[low]["scale"]
    assert descent["speedup_over_pick"] == pytest.approx(1 / shipped["ratio_to_pick"])
    _check_descended_policy(search, run_dir, descent["steps"])


def _check_descended_policy(search: dict, run_dir, bisection: list[dict]) -> None:
    """Every keep ratio is the pick's times a held step's scale to the power of its run's
    weight (1 for every layer when no run saved anything), unless it reached the profile's
    least keep ratio (0.25)."""
    pick_episode = search["floor_tries"][-1]["episode"]
    pick = next(r for r in episodes_of(run_dir) if r["episode"] == pick_episode)["policy"]
    shipped = json.loads((run_dir / "policy.json").read_text())["layers"]
    step = bisection[search["descent"]["shipped_step"] - 1]
    runs = search["descent"]["direction"]
    weights = {n: r.get("weight", 1.0) for r in runs for n in r["layers"]}
    for name, action in pick["layers"].items():
        weight = weights.get(name, 0.0) if any("weight" in r for r in runs) else 1.0
        weight = 0.0 if name == "fc" else weight
        expected = max(0.25, action["keep_ratio"] * step["scale"] ** weight)
        assert shipped[name]["keep_ratio"] == pytest.approx(expected, abs=2e-3)
    assert any(shipped[n]["keep_ratio"] < a["keep_ratio"] for n, a in pick["layers"].items())
