"""Whether a latency budget can be met at all, decided before the search spends its episodes.

The fastest candidate the search can build is the original with every prunable layer at the
profile's minimum keep ratio, every layer in the precision that measured fastest on the
original (and, for N2N, every removable block gone). It is exported and measured once (cached,
so the search reuses the figure). A budget below its physical floor, or below even the fastest
single timed run of it, cannot be met by any statistic of any candidate: the run stops there.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.policy import LayerAction, Policy, Precision
from pipeline.core.space import SearchSpace


def fastest_policy(space: SearchSpace, agent: str) -> Policy:
    """The policy of the fastest candidate the search space holds for `agent`."""
    measured = space.precision_latency_ms
    fastest = Precision(min(measured, key=measured.get)) if measured else Precision.FP32
    layers = {
        layer.name: LayerAction(space.min_keep if layer.prunable else 1.0, fastest)
        for layer in space.layers
    }
    removed = space.removable_blocks if agent == "n2n" else ()  # only N2N removes blocks
    return Policy(layers, tuple(removed))


def describe(space: SearchSpace, policy: Policy) -> str:
    precision = next(iter(policy.layers.values())).precision.value if policy.layers else "fp32"
    blocks = f", {len(policy.removed)} blocks removed" if policy.removed else ""
    return f"every layer at keep ratio {space.min_keep:g} in {precision}{blocks}"


def infeasible(
    budget_ms: float,
    stats: dict[str, Any],
    floor_ms: float | None,
    statistic: str,
    what: str,
) -> str | None:
    """The one-line reason `budget_ms` cannot be met, or None when it may be.

    Args:
        budget_ms: The budget, compared with `statistic`.
        stats: The fastest candidate's latency statistics in ms (`min` and `statistic`).
        floor_ms: Its physical floor in ms, None when unknown.
        statistic: The profile's statistic (median, p90 or mean; never below `min`).
        what: The fastest candidate in words.
    """
    if floor_ms is not None and budget_ms < floor_ms:
        return (
            f"infeasible: the {budget_ms:.4g} ms budget is {floor_ms - budget_ms:.4g} ms below "
            f"the physical floor ({floor_ms:.4g} ms) of the fastest candidate the search can "
            f"build ({what}); raise the budget to at least {floor_ms:.4g} ms"
        )
    fastest = float(stats.get("min", stats[statistic]))
    if budget_ms < fastest:
        return (
            f"infeasible: the {budget_ms:.4g} ms budget is {fastest - budget_ms:.4g} ms "
            f"({1 - budget_ms / fastest:.0%}) below the fastest candidate the search can build "
            f"({what}: fastest timed run {fastest:.4g} ms, {statistic} "
            f"{float(stats[statistic]):.4g} ms); raise the budget, lower the profile's "
            "min_keep_ratio, or allow a faster precision"
        )
    return None
