"""The accuracy-floor objective: the fastest candidate whose accuracy holds the floor (and meets
any budget), chosen, rewarded and bisected for as the budget objective is."""

from __future__ import annotations

import dataclasses
import math

import pytest

from agents.baselines import UniformAgent
from agents.rewards import REWARDS, budget_reward
from pipeline.core.choice import choose_best, closest
from pipeline.core.policy import Policy, Precision
from pipeline.core.space import CandidateResult, LayerInfo, SearchSpace

reward = REWARDS["budget"]


def _space(budget: float | None = None, drop: float | None = 0.01) -> SearchSpace:
    layers = (
        LayerInfo("conv1", "conv", 3, 16, 3, 1, 1000, 400, 0.6, True, "conv1"),
        LayerInfo("conv2", "conv", 16, 16, 3, 1, 2000, 2300, 0.3, True, "conv2"),
        LayerInfo("fc", "linear", 16, 10, 1, 1, 160, 170, 0.02, False, "fc"),
    )
    space = SearchSpace(layers, (Precision.INT8, Precision.FP32), 0.25, budget, 0.9, 10.0, 3160)
    return dataclasses.replace(space, max_accuracy_drop=drop)


def _record(episode: int, accuracy: float, latency: float, meets: bool = True) -> dict:
    return {
        "episode": episode,
        "accuracy": accuracy,
        "latency_ms": latency,
        "meets_budget": meets,
        "error": None,
    }


def test_the_objective_follows_the_constraints_given() -> None:
    assert _space().objective == "floor" and _space().accuracy_floor == pytest.approx(0.89)
    assert _space(budget=5.0).objective == "both"
    assert _space(budget=5.0, drop=None).objective == "budget"
    assert _space(drop=None).accuracy_floor is None


def test_the_fastest_candidate_within_the_floor_is_chosen() -> None:
    records = [
        _record(0, 0.90, 8.0),
        _record(1, 0.895, 5.0),  # holds the 0.89 floor: the fastest that does
        _record(2, 0.89, 6.0),  # exactly at the floor holds it
        _record(3, 0.85, 2.0),  # faster, but loses too much
        _record(4, 0.90, 4.0, meets=False),  # misses the budget: never chosen
    ]
    assert choose_best(records, 1 / 200, floor=0.89)["episode"] == 1
    assert choose_best(records, 1 / 1000)["episode"] == 0  # budget objective: the most accurate
    assert choose_best(records[3:4], 1 / 200, floor=0.89) is None
    # Nothing holds the floor: the nearest is the most accurate that meets the budget
    assert closest(records[3:], floor=0.89)["episode"] == 3
    assert closest(records[3:])["episode"] == 3  # the budget objective: the fastest


def test_within_the_floor_the_reward_is_speed_and_below_it_always_less() -> None:
    space = _space()
    slow = budget_reward(CandidateResult(Policy(), 0.90, 8.0), space, 0.5)
    fast = budget_reward(CandidateResult(Policy(), 0.895, 4.0), space, 0.5)
    fastest_below = budget_reward(CandidateResult(Policy(), 0.80, 1.0), space, 0.5)
    assert fast > slow > 0
    assert fastest_below < slow  # no speed buys a lost floor
    both = _space(budget=5.0)  # over the budget costs as before
    assert budget_reward(CandidateResult(Policy(), 0.90, 8.0), both, 0.5) < slow
    nan_floor = dataclasses.replace(space, max_accuracy_drop=math.nan)
    assert math.isfinite(budget_reward(CandidateResult(Policy(), 0.5, 4.0), nan_floor, 0.5))


class _Curve:
    """A deterministic stand-in for the target and the fine-tune, so that the bisection's own
    logic is what is tested: accuracy and latency grow with the uniform keep ratio."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def evaluate(self, policy: Policy) -> CandidateResult:
        keep = min(a.keep_ratio for a in policy.layers.values())
        return CandidateResult(policy, 0.80 + 0.1 * keep, 1.0 + 9.0 * keep)


def test_the_uniform_bisection_finds_the_smallest_keep_that_holds_the_floor() -> None:
    space = _space(drop=0.03)  # floor 0.87: accuracy 0.80 + 0.1 keep holds it from keep 0.7
    agent = UniformAgent(_Curve(space), reward, seed=0)
    seen: list[CandidateResult] = []
    agent.search(episodes=12, on_episode=lambda result, _: seen.append(result))
    assert agent.best_keep() == pytest.approx(0.7, abs=UniformAgent.TOLERANCE)
    assert agent.best_keep() >= 0.7 - 1e-9  # never one that loses the floor
    (bisection,) = agent.anchors.bisections  # the original measured in no precision: FP32
    assert bisection.high - bisection.low < UniformAgent.TOLERANCE or len(seen) == 12


class _Precisions(_Curve):
    """INT8 runs at half FP32's latency and loses `int8_loss` of accuracy at every keep."""

    def __init__(self, space: SearchSpace, int8_loss: float) -> None:
        super().__init__(dataclasses.replace(space, precision_latency_ms={"int8": 5, "fp32": 10}))
        self.int8_loss = int8_loss

    def evaluate(self, policy: Policy) -> CandidateResult:
        result = super().evaluate(policy)
        if {a.precision for a in policy.layers.values()} != {Precision.INT8}:
            return result
        accuracy = result.accuracy - self.int8_loss
        return CandidateResult(policy, accuracy, 0.5 * result.latency_ms)


@pytest.mark.parametrize(
    ("budget", "drop", "int8_loss", "chosen"),
    [
        # Floor 0.87: FP32 holds it from keep 0.7 (7.3 ms); INT8 losing 0.01 from keep 0.8
        # (4.1 ms), losing 0.04 never.
        (None, 0.03, 0.01, Precision.INT8),
        (None, 0.03, 0.04, Precision.FP32),
        # Budget 5 ms: INT8 meets it unpruned (0.90 - loss); FP32 from keep 0.44 (0.844).
        (5.0, None, 0.04, Precision.INT8),
        (5.0, None, 0.06, Precision.FP32),
    ],
)
def test_the_uniform_search_prunes_in_the_precision_that_serves_the_objective(
    budget, drop, int8_loss, chosen
) -> None:
    curve = _Precisions(_space(budget=budget, drop=drop), int8_loss)
    agent = UniformAgent(curve, reward, seed=0)
    assert [b.precision for b in agent.anchors.bisections] == [Precision.INT8, Precision.FP32]
    seen: list[CandidateResult] = []
    agent.search(episodes=16, on_episode=lambda result, _: seen.append(result))
    assert agent.prune_precision() == chosen
    keep = agent.best_keep()
    ran = [r for r in seen if {a.precision for a in r.policy.layers.values()} == {chosen}]
    best = [r for r in ran if min(a.keep_ratio for a in r.policy.layers.values()) == keep]
    assert best, "the anchor's keep ratio was evaluated in its precision"
    # Both precisions were bisected, each within its share of the episodes
    assert {len(b.results) for b in agent.anchors.bisections} <= set(range(1, 9))
