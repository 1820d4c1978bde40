"""DECORE on the real evaluator: per-channel agents, measured candidates, save and resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import Collect

from agents.decore import DecoreAgent
from agents.rewards import REWARDS
from pipeline.core.errors import ModelError
from pipeline.core.space import CandidateResult
from pipeline.model.prune import prune_model

reward = REWARDS["budget"]


def test_search_reports_every_episode_with_a_policy_over_the_groups(tiny_evaluator):
    agent = DecoreAgent(tiny_evaluator, reward, seed=0, steps_per_episode=2, init_logit=0.0)
    collect = Collect()
    agent.search(episodes=3, on_episode=collect)

    assert len(collect.results) == 3 and agent.episodes_done == 3
    assert all(math.isfinite(r) for r in collect.rewards)
    assert all(r.ok for r in collect.results), [r.error for r in collect.results]
    space = tiny_evaluator.space
    groups = {layer.group for layer in space.prunable}
    policy = collect.results[-1].policy
    assert set(policy.channel_scores) == groups
    assert {n for n in policy.layers} == {layer.name for layer in space.layers}
    for layer in space.layers:
        keep = policy.action(layer.name).keep_ratio
        assert space.min_keep <= keep <= 1.0
        scores = np.array(policy.channel_scores.get(layer.group, [1.0]))
        if layer.prunable:  # the keep ratio is the fraction the agents keep (p >= 0.5)
            assert keep == pytest.approx(max((scores >= 0.5).mean(), space.min_keep))
        else:
            assert keep == 1.0
    # With w = 0 (p = 0.5, a coin flip) the agents drop channels after a few updates.
    assert any(policy.action(layer.name).keep_ratio < 1.0 for layer in space.prunable)


def test_pruning_removes_the_channels_the_agents_drop(tiny_evaluator):
    agent = DecoreAgent(tiny_evaluator, reward, seed=1)
    agent._ensure_gate()
    with torch.no_grad():  # make the agents of conv1's group drop exactly channels 8..23
        agent.logits["conv1"].fill_(3.0)
        agent.logits["conv1"][8:24] = -3.0
    policy = agent.current_policy()
    assert policy.action("layer1.0.conv2").keep_ratio == pytest.approx(48 / 64)
    model = tiny_evaluator.model
    kept = model.conv1.weight.detach().clone()
    result = prune_model(copy.deepcopy(model), policy, (3, 32, 32), multiple=8, min_keep=0.25)
    pruned = result.model.conv1.weight.detach()
    expected = torch.cat([kept[:8], kept[24:]])
    assert pruned.shape[0] == 48 and torch.equal(pruned, expected)


def test_lambda_follows_the_measured_latency(tiny_evaluator):
    space = tiny_evaluator.space
    agent = DecoreAgent(tiny_evaluator, reward, lam=4.0, lam_factor=2.0)
    policy = agent.current_policy()
    slow = CandidateResult(policy, space.original_accuracy, 2 * space.budget_ms)
    agent._adapt_lambda(slow)
    assert agent.lam == 2.0  # over budget: drop more
    lossy = CandidateResult(policy, space.original_accuracy - 0.2, 0.5 * space.budget_ms)
    agent._adapt_lambda(lossy)
    assert agent.lam == 4.0  # within budget but accuracy lost: drop less
    agent._adapt_lambda(CandidateResult(policy, 0.0, None, source="failed", error="x"))
    assert agent.lam == 4.0


def test_advantage_is_decores_reward_less_a_baseline_blind_to_the_own_action(tiny_evaluator):
    keep = torch.tensor([1.0, 0.0, 0.0, 1.0])  # two of four channels dropped
    plain = DecoreAgent(tiny_evaluator, reward, baseline=False)
    assert torch.equal(plain._advantage(keep, 0.5), torch.full((4,), 2 * 0.5))
    agent = DecoreAgent(tiny_evaluator, reward)
    agent._accuracy_mean = 0.4
    advantage = agent._advantage(keep, 0.5)
    # baseline = (channels the others dropped) x running accuracy term
    assert torch.allclose(advantage, torch.tensor([1.0 - 0.8, 1.0 - 0.4, 1.0 - 0.4, 1.0 - 0.8]))


def test_save_load_resumes_to_the_total(tiny_evaluator, tmp_path):
    first = DecoreAgent(tiny_evaluator, reward, seed=3, steps_per_episode=2, lam=3.0)
    collect = Collect()
    first.search(episodes=1, on_episode=collect)
    first.lam = 7.5
    first.save(tmp_path / "agent")

    second = DecoreAgent(tiny_evaluator, reward, seed=99, steps_per_episode=2)
    second.load(tmp_path / "agent")
    assert second.episodes_done == 1 and second.lam == 7.5
    for group, w in first.logits.items():
        assert torch.equal(second.logits[group].detach(), w.detach())
    assert torch.equal(second.generator.get_state(), first.generator.get_state())
    second.search(episodes=2, on_episode=collect)
    assert len(collect.results) == 2 and second.episodes_done == 2
    assert second.steps_done == 2 * 2
    second.search(episodes=2, on_episode=collect)  # already done: no extra candidates
    assert len(collect.results) == 2


def test_resume_against_another_model_is_refused(tiny_evaluator):
    agent = DecoreAgent(tiny_evaluator, reward)
    agent.logits = {"conv1": torch.zeros(3, requires_grad=True)}
    with pytest.raises(ModelError, match="channel groups"):
        agent._ensure_gate()
