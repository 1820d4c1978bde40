"""A budget no candidate can meet is found before the search: below the physical floor of the
fastest candidate the search can build, or below even its fastest timed run."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.core.policy import Precision
from pipeline.core.space import LayerInfo, SearchSpace
from pipeline.run.feasibility import describe, fastest_policy, infeasible

STATS = {"min": 2.0, "median": 2.5, "p90": 3.0, "mean": 2.6}


def test_a_budget_below_the_floor_says_by_how_much() -> None:
    message = infeasible(0.5, STATS, floor_ms=1.25, statistic="median", what="x")
    assert message.startswith("infeasible:") and "physical floor" in message
    assert "0.75 ms below" in message and "\n" not in message


def test_a_budget_below_the_fastest_run_says_by_how_much() -> None:
    message = infeasible(1.5, STATS, floor_ms=0.1, statistic="median", what="x")
    assert message.startswith("infeasible:") and "fastest candidate" in message
    assert "0.5 ms (25%) below" in message and "median 2.5 ms" in message


@pytest.mark.parametrize("budget", [2.0, 2.2, 100.0])
def test_a_budget_the_fastest_candidate_can_reach_is_feasible(budget) -> None:
    # At or above the fastest timed run, a candidate may meet it (noise decides, not physics)
    assert infeasible(budget, STATS, floor_ms=0.1, statistic="p90", what="x") is None
    assert infeasible(budget, STATS, floor_ms=None, statistic="p90", what="x") is None


def _layer(name: str, prunable: bool = True) -> LayerInfo:
    return LayerInfo(name, "conv", 8, 16, 3, 1, 1000, 100, 0.1, prunable, name)


SPACE = SearchSpace(
    layers=(_layer("conv1"), _layer("layer1.conv"), _layer("fc", prunable=False)),
    precisions=(Precision.INT8, Precision.FP32),
    min_keep=0.25,
    budget_ms=1.0,
    original_accuracy=0.9,
    original_latency_ms=2.0,
    original_macs=3000,
    removable_blocks=("layer1",),
    precision_latency_ms={"fp32": 2.0, "int8": 1.0},
)


def test_the_fastest_policy_is_the_minimum_keep_in_the_fastest_precision() -> None:
    policy = fastest_policy(SPACE, "ppo")
    for layer in SPACE.layers:
        action = policy.layers[layer.name]
        assert action.precision == Precision.INT8
        assert action.keep_ratio == (0.25 if layer.prunable else 1.0)
    assert policy.removed == () and "keep ratio 0.25 in int8" in describe(SPACE, policy)
    assert fastest_policy(SPACE, "n2n").removed == ("layer1",)  # only N2N removes blocks
    fp32_faster = dataclasses.replace(SPACE, precision_latency_ms={"fp32": 1.0, "int8": 3.0})
    assert {a.precision for a in fastest_policy(fp32_faster, "ppo").layers.values()} == {
        Precision.FP32
    }


def test_an_impossible_budget_is_found_by_measuring_the_fastest_candidate(tiny_evaluator):
    space = tiny_evaluator.space
    policy = fastest_policy(space, "random")
    stats, floor_ms = tiny_evaluator.measure_untrained(policy)
    assert stats["min"] > 0 and (floor_ms is None or floor_ms < stats["min"])
    # A nanosecond per inference is beyond any machine; an hour is within every one's reach
    assert infeasible(1e-6, stats, floor_ms, "median", "x").startswith("infeasible")
    assert infeasible(3.6e6, stats, floor_ms, "median", "x") is None
    assert tiny_evaluator.real_measurements == 0  # not counted as a search candidate
    again, _ = tiny_evaluator.measure_untrained(policy)
    assert again == stats  # the search reuses the measurement from the cache
