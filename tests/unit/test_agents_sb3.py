"""SB3 agents and baselines against the real CandidateEvaluator (torch-pruning, fine-tune, ONNX
Runtime): each evaluates exactly the requested number of candidates, with finite rewards, and
resumes from a saved folder without evaluating anything twice."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from conftest import Collect

from agents.base import Agent
from agents.baselines import RandomAgent, UniformAgent
from agents.precisions import search_precision
from agents.rewards import budget_reward
from agents.sb3_agents import DQNAgent, SACAgent, TD3Agent
from agents.sb3_ppo import TwoStagePPO
from pipeline.core.errors import ConfigError
from pipeline.core.policy import Policy

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
    if cls is UniformAgent:  # a budget the unpruned model meets in no precision: bisection runs
        space = tiny_evaluator.space
        fastest = min(space.precision_latency_ms.values())
        tiny_evaluator.use_space(dataclasses.replace(space, budget_ms=0.6 * fastest))
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
    """Stage 1 (2 of 3 episodes) prunes in the precision the original measured fastest in;
    stage 2 sets precisions on its best pruning, restored from the saved state."""
    assert agent.stage1_episodes(3) == 2
    stage1, stage2 = collect.results[:2], collect.results[2:]
    fastest = search_precision(agent.space)
    assert all({a.precision for a in r.policy.layers.values()} == {fastest} for r in stage1)
    best = agent.best_stage1[1]
    assert best.keep_ratios() in [r.policy.keep_ratios() for r in stage1]
    assert stage2[0].policy.keep_ratios() == best.keep_ratios()


def _check_bisection(agent: UniformAgent, collect: Collect) -> None:
    """Uniform keep ratios in each anchor precision, each bisection starting at the budget's
    estimate and moved by every measurement."""
    space = agent.space
    for bisection in agent.anchors.bisections:
        mine = [r for r in collect.results if _precisions(r.policy) == {bisection.precision}]
        assert len(mine) == len(bisection.results)
        keeps = [_uniform_keep(r.policy, space) for r in mine]
        assert not keeps or keeps[0] == pytest.approx(bisection.estimated_keep())
        for keep, result in zip(keeps, mine, strict=True):
            if result.latency_ms <= space.budget_ms:
                assert bisection.low >= keep
            else:
                assert bisection.high <= keep
    assert agent.anchors.trials() == len(collect.results) == 3


def _precisions(policy: Policy) -> set:
    return {a.precision for a in policy.layers.values()}


def _uniform_keep(policy: Policy, space) -> float:
    keeps = {policy.action(x.name).keep_ratio for x in space.prunable}
    assert len(keeps) == 1
    return keeps.pop()


EXTRA_CHECKS = {TwoStagePPO: _check_two_stage, UniformAgent: _check_bisection}


def test_ppo_opens_with_a_bisection_and_searches_around_it(tiny_evaluator, tmp_path: Path):
    """With a budget, PPO's first candidates are uniform (bisection on measured latency); stage
    1 then scales the largest uniform keep ratio that met the budget, and resume keeps it."""
    collect = Collect()
    agent = TwoStagePPO(tiny_evaluator, budget_reward, seed=0)
    agent.search(episodes=8, on_episode=collect)
    warm = agent.warmup_end
    assert warm is not None and 1 <= warm <= agent.warmup_episodes(8) == 2
    space = tiny_evaluator.space
    for result in collect.results[:warm]:
        _uniform_keep(result.policy, space)  # one keep ratio for every prunable layer
    prune_in = agent.prune_precision()  # the better anchor's, the fastest's without one
    met = [
        r
        for r in collect.results[:warm]
        if r.latency_ms <= space.budget_ms and _precisions(r.policy) == {prune_in}
    ]
    if met:
        assert agent.center == max(_uniform_keep(r.policy, space) for r in met)
        assert agent.envs[1].center == agent.center
    # Episode 6 is the anchor (the best stage-1 pruning in the other precision); when it is no
    # more accurate, stage 1 goes on instead of searching per-layer precisions.
    assert agent.anchor_accuracy == collect.results[5].accuracy
    later = {a.precision for r in collect.results[6:] for a in r.policy.layers.values()}
    assert agent.precision_matters() or later == {prune_in}
    agent.save(tmp_path / "state")
    resumed = TwoStagePPO(tiny_evaluator, budget_reward, seed=0)
    resumed.load(tmp_path / "state")
    assert (resumed.warmup_end, resumed.center) == (warm, agent.center)
    assert resumed.precision_matters() == agent.precision_matters()
