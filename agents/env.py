"""CompressionEnv: an episode walks the model's layers and decides each one's keep ratio and
precision, as AMC and the two-stage DRL paper do; the last step evaluates the whole Policy.

Decisions are made per *unit*: a coupling group of prunable layers (torch-pruning keeps one
channel count per group, so asking again for the group's later layers would only produce
decisions that get overridden) or a single non-prunable layer such as the classifier head
(precision only). A unit's decision applies to all its layers, precision included: mixing
precisions inside a group would put extra casts or Q/DQ pairs on the residual add they share.
Units are visited in the forward order of their first layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from agents.precisions import ordered_precisions, precision_factor, search_precision
from agents.rewards import dense_layer_reward
from pipeline.core.policy import LayerAction, Policy, Precision
from pipeline.core.space import LayerInfo, SearchSpace

MODES = ("prune", "precision", "joint")
N_BINS = 8  # discrete keep ratios, as PuRL's stepped action set

_KINDS = ("conv", "dwconv", "linear")
OBS_SIZE = 16
_PROXY_MEMO_SIZE = 4096
_BUDGET_OBS_MAX = 2.0  # the budget-used feature is clipped here (1.0 = exactly at budget)


@dataclass(frozen=True)
class Unit:
    """One decision: the layers it covers, in forward order (the first one describes it)."""

    layers: tuple[LayerInfo, ...]

    @property
    def first(self) -> LayerInfo:
        return self.layers[0]

    @property
    def prunable(self) -> bool:
        return self.first.prunable


def decision_units(space: SearchSpace) -> list[Unit]:
    """Prunable layers grouped by coupling group, plus each non-prunable layer on its own."""
    members: dict[str, list[LayerInfo]] = {}
    for layer in space.layers:
        key = f"group:{layer.group}" if layer.prunable else f"layer:{layer.name}"
        members.setdefault(key, []).append(layer)
    return [Unit(tuple(layers)) for layers in members.values()]  # dicts keep first-seen order


def keep_bins(space: SearchSpace, n_bins: int = N_BINS) -> np.ndarray:
    """The discrete keep ratios: n_bins evenly spaced from min_keep to 1.0."""
    return np.linspace(_min_keep(space), 1.0, n_bins)


def _min_keep(space: SearchSpace) -> float:
    value = float(space.min_keep)
    return min(max(value, 1e-3), 1.0) if math.isfinite(value) else 0.1


def layer_shares(space: SearchSpace) -> dict[str, float]:
    """Each layer's share of the original latency: measured shares when known, else MACs."""
    shares = {x.name: max(float(x.latency_share), 0.0) for x in space.layers}
    if sum(shares.values()) > 0:
        return shares
    total = max(sum(x.macs for x in space.layers), 1)
    return {x.name: x.macs / total for x in space.layers}


def build_policy(
    space: SearchSpace, units: list[Unit], keeps: list[float], precisions: list[Precision]
) -> Policy:
    """A Policy naming every layer of `space`: each unit's keep ratio (1.0 for non-prunable
    units, clipped to [min_keep, 1] otherwise) and precision applied to all its layers."""
    actions: dict[str, LayerAction] = {}
    low = _min_keep(space)
    for unit, keep, precision in zip(units, keeps, precisions, strict=True):
        ratio = min(max(float(keep), low), 1.0) if unit.prunable else 1.0
        for layer in unit.layers:
            actions[layer.name] = LayerAction(ratio, precision)
    return Policy({x.name: actions[x.name] for x in space.layers})


class CompressionEnv(gym.Env):
    """Walks the decision units of a SearchSpace; the terminal reward is the evaluated Policy's.

    Args:
        space: the search space.
        evaluate_fn: policy -> reward, called once per episode at its last step (the agent's
            `evaluate`, which scores and reports the candidate).
        mode: "prune" (keep ratios of prunable units, precision fixed to `precision`),
            "precision" (precision of every unit, keep ratios fixed from `base_policy`) or
            "joint" (both; non-prunable units only choose a precision).
        discrete: `Discrete(n_bins * n_precisions)` actions (DQN) instead of a Box in [-1, 1].
        n_bins: discrete keep ratios, evenly spaced from min_keep to 1.
        precision: the fixed precision in "prune" mode (default: `search_precision`).
        base_policy: keep ratios for "precision" mode (default: keep everything).
        dense: PuRL's per-step rewards from `proxy_fn` (pruning decisions only).
        proxy_fn: policy -> accuracy without fine-tuning (the evaluator's `proxy_accuracy`).
        center: continuous keep actions scale this keep ratio (action -1..1: half to twice it,
            clipped to [min_keep, 1]) instead of spanning [min_keep, 1].
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self,
        space: SearchSpace,
        evaluate_fn: Callable[[Policy], float],
        mode: str = "joint",
        discrete: bool = False,
        n_bins: int = N_BINS,
        precision: Precision | None = None,
        base_policy: Policy | None = None,
        dense: bool = False,
        proxy_fn: Callable[[Policy], float] | None = None,
        center: float | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if dense and proxy_fn is None:
            raise ValueError("dense rewards need proxy_fn (the evaluator's proxy_accuracy)")
        super().__init__()
        self.space, self.evaluate_fn, self.mode = space, evaluate_fn, mode
        self.discrete, self.dense, self.proxy_fn = discrete, dense, proxy_fn
        self.center = center
        self.all_units = decision_units(space)
        chosen = [i for i, u in enumerate(self.all_units) if mode != "prune" or u.prunable]
        self._unit_index = chosen
        self.units = [self.all_units[i] for i in chosen]
        if not self.units:
            raise ValueError(f"the search space has nothing to decide in {mode!r} mode")
        self.precisions = ordered_precisions(space)
        self.fixed_precision = precision or search_precision(space)
        self.base_policy = base_policy or Policy()
        self.bins = keep_bins(space, n_bins)
        self.chooses_keep = mode in ("prune", "joint")
        self.chooses_precision = mode in ("precision", "joint") and len(self.precisions) > 1
        self.action_space = self._make_action_space()
        self.observation_space = gym.spaces.Box(0.0, _obs_high(), dtype=np.float32)
        self._features = _static_features(space, self.units, self.base_policy, mode)
        self._shares = layer_shares(space)
        self._rest = max(1.0 - sum(self._shares.values()), 0.0)  # time outside conv/linear
        self._proxy_memo: dict[tuple[float, ...], float] = {}
        self._reset_episode()

    # -- spaces -------------------------------------------------------------------------------

    def _make_action_space(self) -> gym.spaces.Space:
        n_keep = len(self.bins) if self.chooses_keep else 1
        n_prec = len(self.precisions) if self.chooses_precision else 1
        if self.discrete:
            return gym.spaces.Discrete(n_keep * n_prec)
        size = 2 if (self.chooses_keep and self.chooses_precision) else 1
        return gym.spaces.Box(-1.0, 1.0, shape=(size,), dtype=np.float32)

    def set_base_policy(self, policy: Policy) -> None:
        """Replace the keep ratios "precision" mode works on (from the next episode on)."""
        self.base_policy = policy
        self._features = _static_features(self.space, self.units, policy, self.mode)

    @property
    def episode_length(self) -> int:
        """Steps per episode: one per decision unit."""
        return len(self.units)

    def decode(self, action: Any) -> tuple[float | None, Precision | None]:
        """(keep ratio or None, precision or None) of an action; None where the mode fixes it."""
        if self.discrete:
            index = int(np.asarray(action).reshape(-1)[0])
            n_prec = len(self.precisions) if self.chooses_precision else 1
            keep_i, prec_i = divmod(index, n_prec)
            keep = float(self.bins[min(keep_i, len(self.bins) - 1)]) if self.chooses_keep else None
            return keep, (self.precisions[prec_i] if self.chooses_precision else None)
        values = np.clip(np.nan_to_num(np.asarray(action, dtype=np.float64).reshape(-1)), -1, 1)
        fractions = (values + 1.0) / 2.0  # [-1, 1] -> [0, 1]
        keep = prec = None
        if self.chooses_keep and self.center is not None:  # from half to twice the center
            keep = min(max(self.center * 2.0 ** float(values[0]), float(self.bins[0])), 1.0)
        elif self.chooses_keep:
            low = float(self.bins[0])
            keep = low + float(fractions[0]) * (1.0 - low)
        if self.chooses_precision:
            n = len(self.precisions)
            prec = self.precisions[min(int(float(fractions[-1]) * n), n - 1)]
        return keep, prec

    # -- episode ------------------------------------------------------------------------------

    def _reset_episode(self) -> None:
        self._step = 0
        self._decided: dict[int, tuple[float, Precision]] = {}  # all_units index -> decision
        self._last: tuple[float, Precision] | None = None
        self._proxy_prev: float | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._reset_episode()
        return self._observation(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._step >= len(self.units):
            raise RuntimeError("step() after the episode ended: call reset()")
        unit = self.units[self._step]
        keep, prec = self.decode(action)
        keep = keep if keep is not None and unit.prunable else self._default_keep(unit)
        self._last = (keep, prec or self.fixed_precision)
        self._decided[self._unit_index[self._step]] = self._last
        reward = self._dense_reward(unit) if self.dense else 0.0
        self._step += 1
        info: dict[str, Any] = {}
        terminated = self._step == len(self.units)
        if terminated:
            policy = self.policy()
            reward += float(self.evaluate_fn(policy))
            info["policy"] = policy
        reward = reward if math.isfinite(reward) else -1.0  # NaN never reaches an agent
        return self._observation(), float(reward), terminated, False, info

    def _default_keep(self, unit: Unit) -> float:
        """An undecided unit's keep ratio: the base policy's (1.0 for non-prunable units)."""
        return self.base_policy.action(unit.first.name).keep_ratio if unit.prunable else 1.0

    def _decisions(self) -> list[tuple[float, Precision]]:
        """(keep, precision) of every unit of the space: decided ones, else the defaults."""
        return [
            self._decided.get(i, (self._default_keep(u), self.fixed_precision))
            for i, u in enumerate(self.all_units)
        ]

    def policy(self) -> Policy:
        """The Policy of the decisions so far; undecided units keep their defaults."""
        decisions = self._decisions()
        keeps, precs = [d[0] for d in decisions], [d[1] for d in decisions]
        return build_policy(self.space, self.all_units, keeps, precs)

    def _dense_reward(self, unit: Unit) -> float:
        """PuRL's per-layer reward; the proxy is only re-run when this decision prunes."""
        assert self._last is not None
        if self._proxy_prev is None:  # first step: compare with the policy before any decision
            keeps = [self._default_keep(u) for u in self.all_units]
            precs = [self.fixed_precision] * len(keeps)
            self._proxy_prev = self._proxy(build_policy(self.space, self.all_units, keeps, precs))
        before = self._proxy_prev
        keep, prec = self._last
        after = self._proxy(self.policy()) if keep < self._default_keep(unit) else before
        self._proxy_prev = after
        factor = precision_factor(self.space, prec)
        return dense_layer_reward(before, after, keep, unit.first, self.space, factor)

    def _proxy(self, policy: Policy) -> float:
        """The proxy accuracy of `policy`, memoised by its keep ratios (the proxy prunes without
        quantizing): episodes often share prefixes, and each proxy prunes a model copy."""
        assert self.proxy_fn is not None
        key = tuple(round(a.keep_ratio, 6) for a in policy.layers.values())
        if key not in self._proxy_memo:
            if len(self._proxy_memo) >= _PROXY_MEMO_SIZE:
                self._proxy_memo.pop(next(iter(self._proxy_memo)))  # oldest first
            self._proxy_memo[key] = float(self.proxy_fn(policy))
        return self._proxy_memo[key]

    # -- observation --------------------------------------------------------------------------

    def _budget_used(self) -> float:
        """Estimated latency of the episode's policy over the budget's fraction of the original.

        Decided units count share * keep * precision factor, undecided ones their default;
        linear in keep (conservative: the next layer's inputs shrink too, but measured
        speed-ups are often smaller than MAC counts suggest).
        """
        estimate = self._rest
        for unit, (keep, prec) in zip(self.all_units, self._decisions(), strict=True):
            share = sum(self._shares[x.name] for x in unit.layers)
            estimate += share * keep * precision_factor(self.space, prec)
        budget, original = self.space.budget_ms, self.space.original_latency_ms
        limit = budget / original if budget and original and budget > 0 and original > 0 else 1.0
        return estimate / limit if math.isfinite(limit) and limit > 0 else estimate

    def _observation(self) -> np.ndarray:
        index = min(self._step, len(self.units) - 1)
        obs = self._features[index].copy()
        obs[0] = self._step / len(self.units)
        obs[11] = self._budget_used()
        if self._last is not None:
            keep, prec = self._last
            low, n = float(self.bins[0]), len(self.precisions)
            obs[12] = (keep - low) / (1.0 - low) if low < 1.0 else 1.0
            obs[13] = (
                self.precisions.index(prec) / (n - 1) if n > 1 and prec in self.precisions else 1.0
            )
        obs = np.nan_to_num(obs, nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(obs, 0.0, _obs_high()).astype(np.float32)


def _obs_high() -> np.ndarray:
    high = np.ones(OBS_SIZE, dtype=np.float32)
    high[11] = _BUDGET_OBS_MAX
    return high


def _static_features(
    space: SearchSpace, units: list[Unit], base: Policy, mode: str
) -> list[np.ndarray]:
    """Per-unit features that do not change within an episode (see `_unit_features`)."""
    shares = layer_shares(space)
    totals = {
        "macs": max(sum(x.macs for x in space.layers), 1),
        "params": max(sum(x.params for x in space.layers), 1),
        "channels": math.log1p(max(max(x.in_channels, x.out_channels) for x in space.layers)),
        "kernel": max(max(x.kernel for x in space.layers), 1),
        "stride": max(max(x.stride for x in space.layers), 1),
    }
    return [_unit_features(u, shares, totals, base, mode) for u in units]


def _unit_features(
    unit: Unit, shares: dict[str, float], totals: dict[str, float], base: Policy, mode: str
) -> np.ndarray:
    """[0] index (set per step), [1:4] kind one-hot, [4:6] log in/out channels, [6] kernel,
    [7] stride, [8] MACs share, [9] params share, [10] latency share, [11] budget used (set per
    step), [12:14] previous keep and precision (set per step), [14] the unit's fixed keep ratio
    in precision mode (1 otherwise), [15] prunable."""
    first = unit.first
    obs = np.zeros(OBS_SIZE, dtype=np.float64)
    obs[1 + _KINDS.index(first.kind) if first.kind in _KINDS else 1] = 1.0
    obs[4] = math.log1p(first.in_channels) / totals["channels"]
    obs[5] = math.log1p(first.out_channels) / totals["channels"]
    obs[6] = first.kernel / totals["kernel"]
    obs[7] = first.stride / totals["stride"]
    obs[8] = sum(x.macs for x in unit.layers) / totals["macs"]
    obs[9] = sum(x.params for x in unit.layers) / totals["params"]
    obs[10] = sum(shares[x.name] for x in unit.layers)
    obs[12] = obs[13] = 1.0  # "previous action" before the first one: keep all, widest precision
    obs[14] = base.action(first.name).keep_ratio if mode == "precision" else 1.0
    obs[15] = 1.0 if unit.prunable else 0.0
    return obs
