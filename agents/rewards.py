"""Rewards: a candidate's measured accuracy and latency turned into one finite number.

Every episode reward has the signature `(result, space, progress) -> float`
(`pipeline.core.space.RewardFn`) and is finite for any input, NaN included: failures are data,
and NaN never reaches an agent. `REWARDS` maps the names a RunConfig uses to the functions.
`dense_layer_reward` is PuRL's per-layer signal, used by the env between the episode's terminal
rewards.
"""

from __future__ import annotations

import math

from pipeline.core.space import CandidateResult, LayerInfo, RewardFn, SearchSpace

FAILED_REWARD = -1.0
"""What a failed candidate (and a degenerate one, accuracy 0) earns: N2N's -1."""

SPEED_WEIGHT = 0.1
"""Within the budget, the share of the reward that speed can still earn (the rest is accuracy)."""

PENALTY_START = 0.5
PENALTY_END = 5.0
"""Weight of the over-budget penalty per unit of overshoot, annealed over the search's progress."""

MIN_DROP_UNIT = 0.01  # an accuracy shortfall is counted in allowed drops of at least 1 point

MAX_OVERSHOOT = 10.0  # latency/budget - 1 beyond this is as bad as it gets (keeps rewards bounded)

DEFAULT_REQUIRED_SAVING = 0.5
"""Dense rewards without a budget: the latency fraction to save, like PuRL's sparsity target."""


def _finite(value: float | None, default: float) -> float:
    """`value` as a float, or `default` when it is missing, NaN or infinite."""
    if value is None:
        return default
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _valid_latency(result: CandidateResult) -> float | None:
    """The candidate's latency when it is usable for a reward, else None (failed, NaN, <= 0)."""
    if not result.ok:
        return None
    latency = _finite(result.latency_ms, -1.0)
    return latency if latency > 0 else None


def _budget(space: SearchSpace) -> float | None:
    """The latency budget in ms; a NaN, infinite or non-positive budget counts as none."""
    budget = _finite(space.budget_ms, -1.0)
    return budget if budget > 0 else None


def relative_accuracy(accuracy: float, space: SearchSpace) -> float:
    """N2N's R_a = A / A_teacher, clipped to [0, 1.5]; the absolute accuracy when the original's
    accuracy is unknown or zero."""
    acc = _clip(_finite(accuracy, 0.0), 0.0, 1.0)
    reference = _finite(space.original_accuracy, 0.0)
    return _clip(acc / reference, 0.0, 1.5) if reference > 0 else acc


def latency_compression(latency_ms: float, space: SearchSpace) -> float:
    """C = 1 - latency / original latency, clipped to [0, 1] (0 when the original is unknown)."""
    original = _finite(space.original_latency_ms, 0.0)
    if original <= 0:
        return 0.0
    return _clip(1.0 - latency_ms / original, 0.0, 1.0)


def over_budget_penalty(latency_ms: float, space: SearchSpace, progress: float) -> float:
    """Penalty for exceeding the budget: weight(progress) * (latency / budget - 1), 0 within it.

    The weight grows linearly from PENALTY_START to PENALTY_END as the search progresses. N2N
    introduces its constraint gradually so that early exploration is not cut off by a harsh
    penalty; unlike N2N's flat -1 we keep the overshoot in the penalty, so the agent can still
    tell "slightly over" from "far over" late in the search.
    """
    budget = _budget(space)
    if budget is None or latency_ms <= budget:
        return 0.0
    return _penalty_weight(progress) * min(latency_ms / budget - 1.0, MAX_OVERSHOOT)


def _penalty_weight(progress: float) -> float:
    p = _clip(_finite(progress, 0.0), 0.0, 1.0)
    return PENALTY_START + (PENALTY_END - PENALTY_START) * p


def under_floor_penalty(accuracy: float, space: SearchSpace, progress: float) -> float:
    """Penalty for falling below the accuracy floor, 0 on or above it (or without one).

    The shortfall counts in units of the allowed drop (at least one point), weighted like the
    over-budget penalty: missing a 1-point floor by 1 point costs what missing a budget by
    100% does.
    """
    floor = space.accuracy_floor
    if floor is None or not math.isfinite(floor) or accuracy >= floor:
        return 0.0
    unit = max(_finite(space.max_accuracy_drop, 0.0), MIN_DROP_UNIT)
    return _penalty_weight(progress) * min((floor - accuracy) / unit, MAX_OVERSHOOT)


def _soft_floor(reward: float) -> float:
    """Negative rewards squashed into (-1, 0) by expm1: order-preserving, and never as low as
    FAILED_REWARD, so a failed or degenerate candidate stays the worst outcome of all."""
    return reward if reward >= 0 else math.expm1(reward)


def budget_reward(result: CandidateResult, space: SearchSpace, progress: float) -> float:
    """The default reward: N2N's R_a * R_c with measured latency as the constrained quantity.

    With a = accuracy / original accuracy and C = 1 - latency / original latency (in [0, 1]):

    - no budget: r = a * C(2 - C), N2N's form (C(2-C) rewards the first speed-ups most).
    - within the budget: r = a * (1 - w + w * C(2 - C)) with w = SPEED_WEIGHT = 0.1. Once the
      budget is met, accuracy is what the user wants; speed breaks ties (a 10% relative accuracy
      drop outweighs any speed-up). N2N's plain product would let a much faster but less
      accurate network win, and a power like (C(2-C))**0.1 collapses to 0 at C = 0, which
      punishes a budget met with almost no speed-up.
    - over the budget: the same value minus `over_budget_penalty` (annealed with `progress`),
      negatives squashed into (-1, 0).
    - with an accuracy floor (`space.max_accuracy_drop`): r = C(2 - C) minus
      `under_floor_penalty` and `over_budget_penalty`, negatives squashed into (-1, 0): the
      fastest candidate that holds the floor earns the most.
    - failed, latency missing or not finite, accuracy 0 or NaN: FAILED_REWARD (-1), lower than
      any valid candidate's reward.

    Args:
        result: the evaluated candidate.
        space: the search space (original accuracy and latency, budget).
        progress: fraction of the search done, in [0, 1].

    Returns:
        A finite reward, at most 1.5.
    """
    latency = _valid_latency(result)
    accuracy = _finite(result.accuracy, 0.0)
    if latency is None or accuracy <= 0:
        return FAILED_REWARD
    a = relative_accuracy(accuracy, space)
    c = latency_compression(latency, space)
    speed = c * (2.0 - c)
    if space.accuracy_floor is not None:  # fastest within the floor: accuracy is a constraint
        penalties = under_floor_penalty(accuracy, space, progress)
        penalties += over_budget_penalty(latency, space, progress)
        return _soft_floor(speed - penalties)
    if _budget(space) is None:
        return a * speed
    reward = a * (1.0 - SPEED_WEIGHT + SPEED_WEIGHT * speed)
    return _soft_floor(reward - over_budget_penalty(latency, space, progress))


def amc_reward(result: CandidateResult, space: SearchSpace, progress: float) -> float:
    """AMC's R = -error * log(cost) with measured latency as the cost, for comparison.

    The latency enters in microseconds, log(1 + us), so the logarithm stays positive for
    sub-millisecond models (with milliseconds, log < 0 would reward a higher error). Over a
    budget the annealed `over_budget_penalty` is subtracted (AMC limited its action space
    instead; our env does not). Failed or degenerate candidates get the reward of error 1 at
    the original latency, minus 1: worse than any candidate that ran.
    """
    original = _finite(space.original_latency_ms, 1.0)
    worst = -math.log1p(1000.0 * max(original, 1e-3)) - 1.0
    latency = _valid_latency(result)
    accuracy = _clip(_finite(result.accuracy, 0.0), 0.0, 1.0)
    if latency is None or accuracy <= 0:
        return worst
    reward = -(1.0 - accuracy) * math.log1p(1000.0 * latency)
    return max(reward - over_budget_penalty(latency, space, progress), worst + 1e-6)


def accuracy_reward(result: CandidateResult, space: SearchSpace, progress: float) -> float:
    """The two-stage DRL paper's accuracy-only reward: a = accuracy / original accuracy, minus
    the annealed over-budget penalty (negatives squashed into (-1, 0)); FAILED_REWARD for failed
    or degenerate candidates. Without a budget, nothing pushes toward speed."""
    latency = _valid_latency(result)
    accuracy = _finite(result.accuracy, 0.0)
    if latency is None or accuracy <= 0:
        return FAILED_REWARD
    reward = relative_accuracy(accuracy, space)
    return _soft_floor(reward - over_budget_penalty(latency, space, progress))


def required_saving(space: SearchSpace) -> float:
    """Fraction of the original latency the budget asks to save, in [0.05, 1].

    Without a budget (or with one the original already meets) it is DEFAULT_REQUIRED_SAVING,
    PuRL's user-given sparsity target in latency terms; the floor keeps ratios finite.
    """
    budget = _budget(space)
    original = _finite(space.original_latency_ms, 0.0)
    if budget is None or original <= 0 or budget >= original:
        return DEFAULT_REQUIRED_SAVING
    return _clip(1.0 - budget / original, 0.05, 1.0)


def layer_weight(layer: LayerInfo, space: SearchSpace) -> float:
    """The layer's share of the prunable layers' latency (their shares sum to 1).

    Falls back to MAC shares when latency shares are unknown (all 0), then to 1 / n.
    """
    prunable = space.prunable or list(space.layers)
    total = sum(max(_finite(x.latency_share, 0.0), 0.0) for x in prunable)
    if total > 0:
        return max(_finite(layer.latency_share, 0.0), 0.0) / total
    total_macs = sum(max(x.macs, 0) for x in prunable)
    if total_macs > 0:
        return max(layer.macs, 0) / total_macs
    return 1.0 / max(len(prunable), 1)


def dense_layer_reward(
    proxy_accuracy_before: float,
    proxy_accuracy_after: float,
    keep_ratio: float,
    layer: LayerInfo,
    space: SearchSpace,
    latency_factor: float = 1.0,
) -> float:
    """PuRL's dense per-layer reward: -(accuracy shortfall + latency-saving shortfall).

    PuRL's R = -beta * (max(1 - A/T_A, 0) + max(1 - P/T_P, 0)) is read per layer:

    - accuracy: retained = after / before (proxy accuracy, pruned without fine-tuning, before
      and after this layer's decision); the term is 1 - retained. Over an episode these
      terms add up to about 1 - (final proxy / original proxy).
    - latency: this layer's saving 1 - keep * latency_factor (the precision's rough speed
      factor) against the saving the budget requires (`required_saving`), capped at 1 and
      weighted by `layer_weight`, so over an episode the terms add up to the estimated
      shortfall from the budget's required saving, between 0 and 1.

    Both terms weigh equally (beta = 1), as in PuRL. The result lies in [-2, 0].

    Args:
        proxy_accuracy_before: proxy accuracy of the partial policy before this layer.
        proxy_accuracy_after: proxy accuracy with this layer's decision applied.
        keep_ratio: the fraction of channels this layer keeps.
        layer: the layer (the first of its coupling group).
        space: the search space.
        latency_factor: estimated latency multiplier of the chosen precision (1 for FP32).

    Returns:
        A finite reward in [-2, 0].
    """
    before = _clip(_finite(proxy_accuracy_before, 0.0), 0.0, 1.0)
    after = _clip(_finite(proxy_accuracy_after, 0.0), 0.0, 1.0)
    retained = _clip(after / before, 0.0, 1.0) if before > 0 else (1.0 if after >= before else 0.0)
    keep = _clip(_finite(keep_ratio, 1.0), 0.0, 1.0)
    factor = _clip(_finite(latency_factor, 1.0), 0.0, 1.0)
    saved = 1.0 - keep * factor  # fraction of this layer's own latency saved
    speed_shortfall = max(1.0 - saved / required_saving(space), 0.0)
    return -((1.0 - retained) + layer_weight(layer, space) * speed_shortfall)


REWARDS: dict[str, RewardFn] = {
    "budget": budget_reward,
    "amc": amc_reward,
    "accuracy": accuracy_reward,
}
