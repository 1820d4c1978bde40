"""N2N on the real evaluator: block removal, then shrinkage, REINFORCE, save and resume."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import Collect, by_size_measure

from agents.n2n import N2NAgent
from agents.n2n_policies import block_features, group_features, shrink_groups
from agents.n2n_removal import budget_removal, floor_removal, restorations, roomy_removal
from agents.precisions import precision_factor, search_precision
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
    # Stage 2 shrinks on top of the chosen removal (the tiny space has a budget): one bisection
    # step on the uniform keep ratio, then ratios from the bins around its anchor.
    assert agent.anchor is not None and len(agent.anchor.results) == 1
    for policy in stage2:
        assert policy.removed == agent.best_removed
        assert min(a.keep_ratio for a in policy.layers.values()) >= space.min_keep
    prunable = {x.name for x in space.prunable}
    keeps = {a.keep_ratio for n, a in stage2[0].layers.items() if n in prunable}
    assert keeps == {agent.anchor.results[0][0]}
    assert {a.keep_ratio for a in stage2[1].layers.values()} <= {1.0, *agent.shrink_ratios}
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
    assert roomy_removal(agent.removals, tiny_evaluator.space) is None  # no floor


def test_under_a_floor_the_removal_is_chosen_on_latencies_measured_side_by_side(
    tiny_evaluator, monkeypatch
):
    """Two removals with room above the floor: the search read the removal slower than the
    unpruned model; measured again side by side (latency in proportion to the graph's size
    here) it is the faster, and it is chosen. One without room is never a finalist."""
    space = dataclasses.replace(tiny_evaluator.space, max_accuracy_drop=0.04)
    tiny_evaluator.use_space(space)
    monkeypatch.setattr(tiny_evaluator.worker, "measure", by_size_measure(tiny_evaluator))
    agent = N2NAgent(tiny_evaluator, reward, seed=0)

    def policy_of(removed):
        return agent._policy(removed, {})

    floor, original = space.accuracy_floor, space.original_latency_ms
    removals = {(): (original, floor + 0.03), ("layer1.0",): (3.0 * original, floor + 0.03)}
    assert floor_removal(removals, space, policy_of, object()) == ((), [])  # the readings
    chosen, session = floor_removal(removals, space, policy_of, tiny_evaluator)
    assert chosen == ("layer1.0",) and len(session) == 2
    by_blocks = {tuple(e["removed"]): e for e in session}
    assert by_blocks[("layer1.0",)]["session_ms"] < by_blocks[()]["session_ms"]
    removals[("layer1.0",)] = (0.5 * original, floor + 0.001)  # holds, but without room
    assert floor_removal(removals, space, policy_of, tiny_evaluator) == ((), [])
    assert floor_removal({("layer1.0",): removals[("layer1.0",)]}, space, policy_of, None) is None
    no_floor = dataclasses.replace(space, max_accuracy_drop=None)
    assert floor_removal(removals, no_floor, policy_of, tiny_evaluator) is None


def _budget_space(evaluator, gate_drop=1.0):
    """0.6 x the unpruned model in the search precision: that model alone cannot meet it."""
    space = evaluator.space
    assert space.budget_ms is not None and space.accuracy_floor is None
    fastest = space.original_latency_ms * precision_factor(space, search_precision(space))
    space = dataclasses.replace(space, budget_ms=0.6 * fastest, gate_drop=gate_drop)
    evaluator.use_space(space)
    return space


def test_under_a_budget_shrinkage_fills_it_from_a_bisected_anchor(tiny_evaluator):
    space = _budget_space(tiny_evaluator)
    agent = N2NAgent(tiny_evaluator, reward, seed=0, removal_prior=0.5, stage1_fraction=0.3)
    collect = Collect()
    agent.search(episodes=8, on_episode=collect)
    # both removals once each, then the bisection on the chosen one, then shrinkage around it
    removed = [r.policy.removed for r in collect.results[:2]]
    assert sorted(removed) == [(), ("layer1.0",)]
    assert agent.chosen == agent.best_removed and agent.chosen in removed
    assert len(agent.removal_session) == 2  # both measured again side by side
    assert agent.anchor is not None and len(agent.anchor.results) == 3
    prunable = {x.name for x in space.prunable}
    for result, (keep, _, _) in zip(collect.results[2:5], agent.anchor.results, strict=True):
        assert result.policy.removed == agent.best_removed
        assert {a.keep_ratio for n, a in result.policy.layers.items() if n in prunable} == {keep}
    first_keep = agent.anchor.results[0][0]
    assert first_keep == pytest.approx(agent.anchor.estimated_keep())
    assert first_keep < 1.0  # uniform pruning is needed to meet the budget
    best = agent.anchor.best()
    if best is not None:  # some keep measured under the budget: the bins scale it
        assert max(agent.shrink_ratios) == pytest.approx(min(1.5 * best[0], 1.0))
        assert best[1] is not None and best[1] <= space.budget_ms
    for result in collect.results[5:]:
        ratios = {a.keep_ratio for a in result.policy.layers.values()}
        assert ratios <= {1.0, *agent.shrink_ratios}


def test_under_a_budget_the_removal_is_chosen_on_latencies_measured_side_by_side(
    tiny_evaluator, monkeypatch
):
    """The search read the removal slower than the unpruned model; measured again side by
    side (latency in proportion to the graph's size here) it is the faster, and, scoring
    within the gate's drop of the best, it is chosen."""
    space = _budget_space(tiny_evaluator, gate_drop=0.015)
    monkeypatch.setattr(tiny_evaluator.worker, "measure", by_size_measure(tiny_evaluator))
    agent = N2NAgent(tiny_evaluator, reward, seed=0)

    def policy_of(removed):
        return agent._policy(removed, {})

    slow = 3.0 * space.original_latency_ms
    removals = {(): (space.original_latency_ms, 0.9), ("layer1.0",): (slow, 0.9)}
    chosen, session = budget_removal(removals, space, policy_of, object())
    assert chosen == () and session == []  # an evaluator without SideBySide: the readings
    chosen, session = budget_removal(removals, space, policy_of, tiny_evaluator)
    assert chosen == ("layer1.0",)
    by_blocks = {tuple(e["removed"]): e for e in session}
    assert by_blocks[("layer1.0",)]["session_ms"] < by_blocks[()]["session_ms"]
    assert by_blocks[("layer1.0",)]["search_ms"] == slow
    # more than the gate's drop below the best: out, however fast
    removals[("layer1.0",)] = (0.5 * space.original_latency_ms, 0.9 - 0.02)
    assert budget_removal(removals, space, policy_of, tiny_evaluator) == ((), [])


def test_under_a_budget_a_fast_removal_below_the_drop_has_its_blocks_restored_one_at_a_time(
    tiny_evaluator,
):
    space = _budget_space(tiny_evaluator, gate_drop=0.015)
    removals = {("a", "b"): (1.0, 0.80), ("a",): (2.0, 0.90), (): (3.0, 0.91)}
    seen = set(removals)
    assert restorations(removals, space, seen) == [("b",)]  # ("a",) was seen
    removals[("a", "b")] = (1.0, 0.90)  # within the drop: nothing to restore
    assert restorations(removals, space, seen) == []


def test_the_chosen_removal_survives_a_resume(tiny_evaluator, tmp_path):
    _budget_space(tiny_evaluator)
    agent = N2NAgent(tiny_evaluator, reward, seed=0, removal_prior=0.5, stage1_fraction=0.5)
    agent.search(episodes=3, on_episode=Collect())
    assert agent.chosen is not None
    agent.save(tmp_path / "agent")
    again = N2NAgent(tiny_evaluator, reward, seed=5)
    again.load(tmp_path / "agent")
    assert again.chosen == agent.chosen and again.removal_session == agent.removal_session
