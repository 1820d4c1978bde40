"""CompressionEnv: a plain gymnasium.Env that SB3's checker accepts, walking the real search space
of a tiny ResNet; its policies cover every layer and respect min_keep."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from stable_baselines3.common.env_checker import check_env

from agents.env import CompressionEnv, decision_units, keep_bins
from agents.precisions import PRECISION_FACTOR, precision_factor, search_precision
from pipeline.core.policy import Policy, Precision
from pipeline.core.space import SearchSpace


@pytest.fixture
def space(tiny_evaluator) -> SearchSpace:
    return tiny_evaluator.space


def _run_episode(env: CompressionEnv, seed: int = 0) -> tuple[int, float, dict]:
    env.reset(seed=seed)
    env.action_space.seed(seed)
    steps, total, info, done = 0, 0.0, {}, False
    while not done:
        _obs, reward, done, truncated, info = env.step(env.action_space.sample())
        assert not truncated
        steps, total = steps + 1, total + reward
    return steps, total, info


# Tests loop over modes instead of parametrizing: each use of the evaluator fixture costs seconds.


def test_check_env_passes_in_every_mode(space: SearchSpace) -> None:
    # check_env steps the env many times: a fixed reward stands in for the evaluator here,
    # since the env (not the evaluator) is what is under test.
    for mode in ("prune", "precision", "joint"):
        for discrete in (False, True):
            env = CompressionEnv(space, lambda _policy: 0.5, mode=mode, discrete=discrete)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a checker warning is a failure too
                check_env(env, warn=True)
    units = decision_units(space)
    assert sum(len(u.layers) for u in units) == len(space.layers)
    assert any(len(u.layers) > 1 for u in units), "ResNet residuals couple layers"
    assert [u.first.name for u in units if not u.prunable] == [space.layers[-1].name]


def test_episodes_build_full_policies(space: SearchSpace) -> None:
    for mode in ("prune", "precision", "joint"):
        _check_episodes(space, mode)
    _check_actions(space)
    _check_budget_observation(space)


def _check_episodes(space: SearchSpace, mode: str) -> None:
    seen: list[Policy] = []
    base = Policy({x.name: Policy().action(x.name) for x in space.layers})
    env = CompressionEnv(space, lambda p: seen.append(p) or 0.25, mode=mode, base_policy=base)
    units = decision_units(space)
    expected = len([u for u in units if u.prunable]) if mode == "prune" else len(units)
    for seed in range(3):
        steps, total, info = _run_episode(env, seed)
        assert steps == env.episode_length == expected
        assert total == 0.25 and info["policy"] is seen[-1]
    assert len(seen) == 3
    for policy in seen:
        assert set(policy.layers) == {x.name for x in space.layers}
        for unit in units:
            actions = {policy.action(x.name) for x in unit.layers}
            assert len(actions) == 1, "a coupling group shares one decision"
            keep = actions.pop().keep_ratio
            assert (space.min_keep <= keep <= 1.0) if unit.prunable else keep == 1.0
        assert {a.precision for a in policy.layers.values()} <= set(space.precisions)
        if mode == "prune":
            assert {a.precision for a in policy.layers.values()} == {search_precision(space)}
        if mode == "precision":
            assert {a.keep_ratio for a in policy.layers.values()} == {1.0}


def _check_actions(space: SearchSpace) -> None:
    env = CompressionEnv(space, lambda _p: 0.0, mode="joint")
    assert env.action_space.shape == (2,)  # keep ratio and precision: two precisions allowed
    assert env.decode(np.array([-1.0, -1.0])) == (pytest.approx(space.min_keep), Precision.INT8)
    assert env.decode(np.array([1.0, 1.0])) == (pytest.approx(1.0), Precision.FP32)
    assert env.decode(np.array([np.nan, 5.0]))[1] == Precision.FP32  # never out of range
    discrete = CompressionEnv(space, lambda _p: 0.0, mode="joint", discrete=True)
    assert discrete.action_space.n == len(keep_bins(space)) * 2
    assert discrete.decode(0) == (pytest.approx(space.min_keep), Precision.INT8)
    assert discrete.decode(discrete.action_space.n - 1) == (pytest.approx(1.0), Precision.FP32)


def _check_budget_observation(space: SearchSpace) -> None:
    env = CompressionEnv(space, lambda _p: 0.0, mode="prune", precision=Precision.FP32)
    obs, _ = env.reset(seed=0)
    start = obs[11]
    assert start == pytest.approx(1.0 / 0.7, rel=0.05)  # full model vs a budget of 70%
    obs, *_ = env.step(np.array([-1.0], dtype=np.float32))  # prune the first unit hard
    assert obs[11] < start
    assert env.observation_space.contains(obs)


def test_dense_rewards_use_the_real_proxy_accuracy(tiny_evaluator) -> None:
    space = tiny_evaluator.space
    env = CompressionEnv(
        space, lambda _p: 0.0, mode="prune", dense=True, proxy_fn=tiny_evaluator.proxy_accuracy
    )
    env.reset(seed=0)
    rewards = [env.step(np.array([-1.0], dtype=np.float32))[1] for _ in range(2)]
    assert all(math.isfinite(r) and -2.0 <= r <= 0.0 for r in rewards)
    assert min(rewards) < 0.0  # pruning to min_keep without fine-tuning loses accuracy


def _with_latencies(space: SearchSpace, **measured: float) -> SearchSpace:
    return dataclasses.replace(
        space, original_latency_ms=measured["fp32"], precision_latency_ms=measured
    )


def test_search_precision_follows_the_measurements(space: SearchSpace) -> None:
    """The target decides: INT8 where it measured clearly faster, FP32 where it is slower or
    within noise, the widest precision when nothing was measured."""
    assert search_precision(_with_latencies(space, fp32=1.0, int8=0.6)) == Precision.INT8
    assert search_precision(_with_latencies(space, fp32=1.0, int8=1.4)) == Precision.FP32
    assert search_precision(_with_latencies(space, fp32=1.0, int8=0.99)) == Precision.FP32
    unknown = dataclasses.replace(space, precision_latency_ms={})
    assert search_precision(unknown) == Precision.FP32
    failed = _with_latencies(space, fp32=1.0, int8=math.nan)
    assert search_precision(failed) == Precision.FP32


def test_precision_factor_is_measured_when_known(space: SearchSpace) -> None:
    measured = _with_latencies(space, fp32=2.0, int8=0.5)
    assert precision_factor(measured, Precision.INT8) == pytest.approx(0.25)
    assert precision_factor(measured, Precision.FP32) == pytest.approx(1.0)
    unknown = dataclasses.replace(space, precision_latency_ms={})
    assert precision_factor(unknown, Precision.INT8) == PRECISION_FACTOR[Precision.INT8]
