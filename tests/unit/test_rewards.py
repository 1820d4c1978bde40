"""Rewards: finite for every input, budget edges, annealed penalty, failures as the worst case."""

from __future__ import annotations

import dataclasses
import math

import pytest

from agents.rewards import (
    FAILED_REWARD,
    REWARDS,
    amc_reward,
    budget_reward,
    dense_layer_reward,
)
from pipeline.core.policy import Policy, Precision
from pipeline.core.space import CandidateResult, LayerInfo, SearchSpace

NAN = float("nan")


def _space(budget: float | None = 7.0) -> SearchSpace:
    layers = (
        LayerInfo("conv1", "conv", 3, 16, 3, 1, 1000, 400, 0.6, True, "conv1"),
        LayerInfo("conv2", "conv", 16, 16, 3, 1, 2000, 2300, 0.3, True, "conv2"),
        LayerInfo("fc", "linear", 16, 10, 1, 1, 160, 170, 0.02, False, "fc"),
    )
    precisions = (Precision.INT8, Precision.FP32)
    return SearchSpace(layers, precisions, 0.25, budget, 0.9, 10.0, 3160)


def _result(accuracy: float = 0.9, latency: float | None = 5.0, **kw) -> CandidateResult:
    return CandidateResult(Policy(), accuracy, latency, **kw)


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_is_finite_on_hostile_inputs(name: str) -> None:
    reward = REWARDS[name]
    spaces = [
        _space(),
        _space(None),
        _space(NAN),
        _space(-1.0),
        dataclasses.replace(_space(), original_accuracy=NAN, original_latency_ms=NAN),
        dataclasses.replace(_space(), original_accuracy=0.0, original_latency_ms=0.0),
    ]
    results = [
        _result(),
        _result(NAN, 5.0),
        _result(0.9, NAN),
        _result(0.9, math.inf),
        _result(0.9, None),
        _result(0.0, 5.0),
        _result(0.9, 0.0),
        _result(0.0, None, source="failed", error="boom"),
    ]
    for space in spaces:
        for result in results:
            for progress in (0.0, 0.5, 1.0, NAN):
                value = reward(result, space, progress)
                assert math.isfinite(value), (space, result, progress)


def test_failed_and_missing_latency_get_the_fixed_penalty() -> None:
    space = _space()
    assert (
        budget_reward(_result(0.0, None, source="failed", error="x"), space, 0.5) == FAILED_REWARD
    )
    assert budget_reward(_result(0.9, None), space, 0.5) == FAILED_REWARD
    assert budget_reward(_result(0.9, 5.0, error="export failed"), space, 0.5) == FAILED_REWARD


def test_accuracy_zero_is_no_better_than_any_valid_candidate() -> None:
    space = _space()
    zero = budget_reward(_result(0.0, 1.0), space, 1.0)
    valid = [budget_reward(_result(acc, lat), space, 1.0) for acc in (0.1, 0.9) for lat in (1, 100)]
    assert all(zero <= v for v in valid)
    assert amc_reward(_result(0.0, 1.0), space, 1.0) < amc_reward(_result(0.1, 100.0), space, 1.0)


def test_budget_met_exactly_is_not_penalised() -> None:
    space = _space(budget=7.0)
    at_budget = budget_reward(_result(0.9, 7.0), space, 1.0)
    c = 1 - 7.0 / 10.0
    assert at_budget == pytest.approx(0.9 + 0.1 * c * (2 - c))  # a = 1: accuracy equals original
    assert budget_reward(_result(0.9, 7.01), space, 1.0) < at_budget


def test_within_budget_accuracy_dominates_and_speed_breaks_ties() -> None:
    space = _space(budget=7.0)
    assert budget_reward(_result(0.9, 6.0), space, 0.0) > budget_reward(
        _result(0.8, 2.0), space, 0.0
    )
    assert budget_reward(_result(0.9, 3.0), space, 0.0) > budget_reward(
        _result(0.9, 6.0), space, 0.0
    )


def test_over_budget_penalty_grows_with_progress() -> None:
    space = _space(budget=7.0)
    over = _result(0.9, 9.0)
    early, late = budget_reward(over, space, 0.0), budget_reward(over, space, 1.0)
    assert late < early
    assert early > FAILED_REWARD and late > FAILED_REWARD  # still better than a failure
    assert budget_reward(_result(0.9, 12.0), space, 1.0) < late  # further over, lower reward


def test_no_budget_is_n2n_product() -> None:
    space = _space(budget=None)
    c = 1 - 4.0 / 10.0
    assert budget_reward(_result(0.45, 4.0), space, 0.3) == pytest.approx(0.5 * c * (2 - c))


def test_amc_reward_prefers_lower_error_and_lower_latency() -> None:
    space = _space(budget=None)
    assert amc_reward(_result(0.9, 0.5), space, 0.0) > amc_reward(_result(0.8, 0.5), space, 0.0)
    assert amc_reward(_result(0.8, 0.4), space, 0.0) > amc_reward(_result(0.8, 0.5), space, 0.0)


def test_dense_layer_reward_trades_accuracy_for_saving() -> None:
    space = _space(budget=5.0)  # 50% of the latency to save
    layer = space.layers[0]
    keep_all = dense_layer_reward(0.8, 0.8, 1.0, layer, space)
    enough = dense_layer_reward(0.8, 0.8, 0.5, layer, space)
    assert enough == 0.0 and keep_all < enough  # saving the required share costs nothing
    assert dense_layer_reward(0.8, 0.4, 0.5, layer, space) == pytest.approx(-0.5)
    assert dense_layer_reward(0.8, 0.8, 0.9, layer, space, latency_factor=0.45) == 0.0
    for args in [(NAN, 0.5, 0.5), (0.5, NAN, NAN), (0.0, 0.0, 0.5), (math.inf, -1.0, 2.0)]:
        assert math.isfinite(dense_layer_reward(*args, layer, space))
