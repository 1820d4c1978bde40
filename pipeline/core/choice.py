"""Which candidate a search ships.

Budget objective: the most accurate under the budget, and among accuracies too close to tell
apart, the fastest. Accuracy-floor objective: the fastest whose accuracy holds the floor (and,
when there is one, meets the budget too).
"""

from __future__ import annotations

from typing import Any

# Accuracies are counts over the validation split: k / n minus 1 / n must equal (k - 1) / n,
# which floating point only promises within a rounding error.
ROUNDING = 1e-9


def tied(accuracy: float, top: float, resolution: float) -> bool:
    """Whether `accuracy` cannot be told apart from `top` (closer than one validation sample)."""
    return accuracy >= top - resolution - ROUNDING


def holds_floor(accuracy: float, floor: float | None) -> bool:
    return floor is None or accuracy >= floor - ROUNDING


def choose_best(
    records: list[dict[str, Any]], resolution: float, floor: float | None = None
) -> dict[str, Any] | None:
    """The candidate the objective prefers among those meeting the budget.

    Without a `floor`: the highest validation accuracy. Accuracies closer than `resolution`
    (one validation sample) are not told apart: among them the fastest wins, so noise in a
    short fine-tune never buys a slower model. With a `floor`: the fastest candidate whose
    accuracy holds it (the more accurate of equally fast ones).
    """
    within = [r for r in records if r["meets_budget"] and r["error"] is None]
    if floor is not None:
        within = [r for r in within if holds_floor(r["accuracy"], floor)]
        return min(within, key=lambda r: (r["latency_ms"], -r["accuracy"]), default=None)
    if not within:
        return None
    top = max(r["accuracy"] for r in within)
    candidates = [r for r in within if tied(r["accuracy"], top, resolution)]
    return min(candidates, key=lambda r: (r["latency_ms"], -r["accuracy"]))


def closest(records: list[dict[str, Any]], floor: float | None = None) -> dict[str, Any] | None:
    """When no candidate meets the objective, the one nearest to it: the fastest (a budget
    missed by the least), or with a floor, the most accurate of those meeting the budget."""
    ran = [r for r in records if r["error"] is None and r["latency_ms"] is not None]
    if floor is None:
        return min(ran, key=lambda r: r["latency_ms"], default=None)
    pool = [r for r in ran if r["meets_budget"]] or ran
    return max(pool, key=lambda r: (r["accuracy"], -r["latency_ms"]), default=None)
