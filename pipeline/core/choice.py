"""Which candidate a search ships: the most accurate under the budget, and among accuracies
too close to tell apart, the fastest."""

from __future__ import annotations

from typing import Any

# Accuracies are counts over the validation split: k / n minus 1 / n must equal (k - 1) / n,
# which floating point only promises within a rounding error.
ROUNDING = 1e-9


def tied(accuracy: float, top: float, resolution: float) -> bool:
    """Whether `accuracy` cannot be told apart from `top` (closer than one validation sample)."""
    return accuracy >= top - resolution - ROUNDING


def choose_best(records: list[dict[str, Any]], resolution: float) -> dict[str, Any] | None:
    """The candidate meeting the budget with the highest validation accuracy.

    Accuracies closer than `resolution` (one validation sample) are not told apart: among
    them the fastest wins, so noise in a short fine-tune never buys a slower model.
    """
    within = [r for r in records if r["meets_budget"] and r["error"] is None]
    if not within:
        return None
    top = max(r["accuracy"] for r in within)
    candidates = [r for r in within if tied(r["accuracy"], top, resolution)]
    return min(candidates, key=lambda r: (r["latency_ms"], -r["accuracy"]))
