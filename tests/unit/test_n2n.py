"""N2N on the real evaluator: block removal, then shrinkage, REINFORCE, save and resume."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import Collect

from agents.n2n import N2NAgent
from agents.n2n_policies import block_features, group_features, shrink_groups
from agents.rewards import REWARDS
from pipeline.core.policy import Policy

reward = REWARDS["budget"]


def test_two_stages_remove_then_shrink(tiny_evaluator):
    space = tiny_evaluator.space
    assert space.removable_blocks == ("layer1.0",)
    agent = N2NAgent(tiny_evaluator, reward, seed=0, removal_prior=0.95)
    collect = Collect()
    agent.search(episodes=3, on_episode=collect)

    assert len(collect.results) == 3 and agent.episodes_done == 3
    assert all(math.isfinite(r) for r in collect.rewards)
    assert all(r.ok for r in collect.results), [r.error for r in collect.results]
    assert agent.stage1_episodes(3) == 1 and agent.stage == 2
    stage1 = [r.policy for r in collect.results[:1]]
    stage2 = [r.policy for r in collect.results[1:]]
    # Stage 1 only removes blocks; with a 95% prior it removes the one it may.
    assert stage1[0].removed == ("layer1.0",)
    for policy in stage1:
        assert all(a.keep_ratio == 1.0 for a in policy.layers.values())
        assert not any(n.startswith(b + ".") for b in policy.removed for n in policy.layers)
    # Stage 2 shrinks on top of the best removal, with ratios from the bins.
    for policy in stage2:
        assert policy.removed == agent.best_removed
        ratios = {a.keep_ratio for a in policy.layers.values()}
        assert ratios <= set(agent.ratios) and min(ratios) >= space.min_keep
    assert any(a.keep_ratio < 1.0 for p in stage2 for a in p.layers.values())
    # A coupled group gets one ratio: conv1 shares its channels with layer1.0.conv2.
    if not stage2[0].removed:
        assert stage2[0].action("conv1") == stage2[0].action("layer1.0.conv2")


def test_policy_gradient_moves_the_removal_policy(tiny_evaluator):
    agent = N2NAgent(tiny_evaluator, reward, seed=1)
    features = block_features(agent.space)
    before = agent.removal.log_prob(features, [1]).item()
    agent.baselines[1] = 0.0
    agent.pending[1] = [([1], 1.0)]  # removing was better than the baseline
    agent._update(1)
    assert agent.removal.log_prob(features, [1]).item() > before
    assert agent.baselines[1] > 0.0 and agent.pending[1] == []
    groups = shrink_groups(agent.space, ())
    shrink_features = group_features(agent.space, groups)
    assert shrink_features.shape == (len(groups), 12) and torch.isfinite(shrink_features).all()


def test_save_load_resumes_to_the_total(tiny_evaluator, tmp_path):
    first = N2NAgent(tiny_evaluator, reward, seed=2, removal_prior=0.5)
    collect = Collect()
    first.search(episodes=2, on_episode=collect)  # one removal, one shrink episode
    first.save(tmp_path / "agent")

    second = N2NAgent(tiny_evaluator, reward, seed=7)
    second.load(tmp_path / "agent")
    assert (second.episodes_done, second.stage) == (2, 2)
    assert second.best_removed == first.best_removed
    assert second.baselines == first.baselines
    for key, value in first.shrink.state_dict().items():
        assert torch.equal(second.shrink.state_dict()[key], value)
    second.search(episodes=3, on_episode=collect)
    assert len(collect.results) == 3 and second.episodes_done == 3
    assert all(r.policy.removed == first.best_removed for r in collect.results[1:])
    second.search(episodes=3, on_episode=collect)  # already done: no extra candidates
    assert len(collect.results) == 3


def test_under_a_floor_stage1_never_repeats_a_removal_and_ends_when_it_only_repeats(
    tiny_evaluator,
):
    space = dataclasses.replace(tiny_evaluator.space, max_accuracy_drop=0.05)
    tiny_evaluator.use_space(space)
    # One removable block: two removals exist, so the third stage-1 draw can only repeat.
    agent = N2NAgent(tiny_evaluator, reward, seed=3, stage1_fraction=0.75)
    collect = Collect()
    agent.search(episodes=4, on_episode=collect)
    assert agent.stage1_episodes(4) == 3 and agent.stage == 2
    removals = [r.policy.removed for r in collect.results]
    assert len(set(removals[:2])) == 2  # both removals, each once
    assert all(
        all(a.keep_ratio == 1.0 for a in p.policy.layers.values()) for p in collect.results[:2]
    )
    # The third episode, stage 1's by the split, went to stage 2 instead (its bisection).
    assert any(a.keep_ratio < 1.0 for a in collect.results[2].policy.layers.values())


def test_under_a_floor_shrinkage_scales_a_bisected_anchor(tiny_evaluator, tmp_path):
    space = dataclasses.replace(tiny_evaluator.space, max_accuracy_drop=0.05)
    tiny_evaluator.use_space(space)
    agent = N2NAgent(tiny_evaluator, reward, seed=0, removal_prior=0.5)
    collect = Collect()
    agent.search(episodes=6, on_episode=collect)  # 2 removals, 2 bisection steps, 2 shrinks
    assert agent.anchor is not None and len(agent.anchor.results) == 2
    anchors = [r.policy for r in collect.results[2:4]]
    for policy, (keep, _, _) in zip(anchors, agent.anchor.results, strict=True):
        assert policy.removed == agent.best_removed
        prunable = {x.name for x in space.prunable}
        assert {a.keep_ratio for n, a in policy.layers.items() if n in prunable} == {keep}
    assert agent.anchor.results[0][0] == pytest.approx((space.min_keep + 1.0) / 2)
    best = agent.anchor.best()
    ratios = agent.shrink_ratios
    if best is None:  # nothing held the floor: the bins span [min_keep, 1] as without one
        assert ratios == agent.ratios
    else:
        assert min(ratios) == pytest.approx(max(0.5 * best[0], space.min_keep))
        assert max(ratios) == pytest.approx(min(1.5 * best[0], 1.0))
    for result in collect.results[4:]:
        assert {a.keep_ratio for a in result.policy.layers.values()} <= set(ratios)
    # The bisection's state survives a resume.
    agent.save(tmp_path / "agent")
    again = N2NAgent(tiny_evaluator, reward, seed=9)
    again.load(tmp_path / "agent")
    assert again.anchor is not None and again.anchor.results == agent.anchor.results
    assert again.seen == agent.seen


def test_under_a_floor_shrinkage_builds_on_a_removal_with_room(tiny_evaluator):
    space = dataclasses.replace(tiny_evaluator.space, max_accuracy_drop=0.04)
    tiny_evaluator.use_space(space)
    agent = N2NAgent(tiny_evaluator, reward, seed=0)
    floor = space.accuracy_floor
    just = Policy({}, removed=("layer1.0",))
    agent.best[1] = (1.0, just)  # the best reward: fastest, but only just above the floor
    agent.removals = {("layer1.0",): (1.0, floor + 0.001), (): (2.0, floor + 0.03)}
    assert agent.best_removed == ()  # the fastest with half the drop (0.02) to spare
    agent.removals[("layer1.0",)] = (1.0, floor + 0.021)
    assert agent.best_removed == ("layer1.0",)
    agent.removals = {("layer1.0",): (1.0, floor + 0.001)}  # none with room: the best reward
    assert agent.best_removed == ("layer1.0",)
    tiny_evaluator.use_space(dataclasses.replace(space, max_accuracy_drop=None))
    assert N2NAgent(tiny_evaluator, reward, seed=0).roomy_removal() is None  # no floor
