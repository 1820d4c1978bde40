"""SB3 agents and baselines against the real CandidateEvaluator (torch-pruning, fine-tune, ONNX
Runtime): each evaluates exactly the requested number of candidates, with finite rewards, and
resumes from a saved folder without evaluating anything twice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import Collect

from agents.base import Agent
from agents.baselines import RandomAgent, UniformAgent
from agents.rewards import budget_reward
from agents.sb3_agents import DQNAgent, SACAgent, TD3Agent, TwoStagePPO
from pipeline.errors import ConfigError
from pipeline.policy import Policy

AGENTS: list[type[Agent]] = [TwoStagePPO, DQNAgent, SACAgent, TD3Agent, UniformAgent, RandomAgent]


def _check_candidates(collect: Collect, space) -> None:
    assert all(math.isfinite(r) for r in collect.rewards)
    for result in collect.results:
        assert result.ok, result.error
        assert set(result.policy.layers) == {x.name for x in space.layers}
        assert all(a.keep_ratio >= space.min_keep for a in result.policy.layers.values())


# One test per agent covers search, stop and resume: each use of the evaluator fixture costs
# seconds (export, ONNX Runtime profiling), and each candidate about one more.


@pytest.mark.parametrize("cls", AGENTS, ids=lambda c: c.name)
def test_search_stops_exactly_and_resumes(cls, tiny_evaluator, tmp_path: Path) -> None:
    collect = Collect()
    agent = cls(tiny_evaluator, budget_reward, seed=0, log_dir=tmp_path / "logs")
    agent.search(episodes=2, on_episode=collect)
    assert len(collect.rewards) == agent.episodes_done == 2
    agent.save(tmp_path / "state")
    other = UniformAgent if cls is RandomAgent else RandomAgent
    with pytest.raises(ConfigError, match="holds the state of agent"):
        other(tiny_evaluator, budget_reward).load(tmp_path / "state")

    resumed = cls(tiny_evaluator, budget_reward, seed=0, log_dir=tmp_path / "logs")
    resumed.load(tmp_path / "state")
    assert resumed.episodes_done == 2
    resumed.search(episodes=3, on_episode=collect)
    assert (len(collect.rewards), resumed.episodes_done) == (3, 3)  # nothing evaluated twice
    resumed.search(episodes=3, on_episode=collect)  # already done: nothing more
    assert len(collect.rewards) == 3

    _check_candidates(collect, tiny_evaluator.space)
    EXTRA_CHECKS.get(cls, lambda *_: None)(resumed, collect)


def _check_two_stage(agent: TwoStagePPO, collect: Collect) -> None:
    """Stage 1 (2 of 3 episodes) prunes in FP32; stage 2 sets precisions on its best pruning,
    restored from the saved state."""
    assert agent.stage1_episodes(3) == 2
    stage1, stage2 = collect.results[:2], collect.results[2:]
    assert all({a.precision.value for a in r.policy.layers.values()} == {"fp32"} for r in stage1)
    best = agent.best_stage1[1]
    assert best.keep_ratios() in [r.policy.keep_ratios() for r in stage1]
    assert stage2[0].policy.keep_ratios() == best.keep_ratios()


def _check_bisection(agent: UniformAgent, collect: Collect) -> None:
    """Uniform keep ratios, starting at the budget's estimate, moved by every measurement."""
    space = agent.space
    keeps = [_uniform_keep(r.policy, space) for r in collect.results]
    assert keeps[0] == pytest.approx(agent.estimated_keep())
    assert len(set(keeps)) == 3
    for keep, result in zip(keeps, collect.results, strict=True):
        if result.latency_ms <= space.budget_ms:
            assert agent.low >= keep
        else:
            assert agent.high <= keep


def _uniform_keep(policy: Policy, space) -> float:
    keeps = {policy.action(x.name).keep_ratio for x in space.prunable}
    assert len(keeps) == 1
    return keeps.pop()


EXTRA_CHECKS = {TwoStagePPO: _check_two_stage, UniformAgent: _check_bisection}
