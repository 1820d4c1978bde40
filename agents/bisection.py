"""Bisection on the uniform keep ratio, in each precision that could serve the objective.

Pruning in the precision the original measured fastest in is right for a tight budget, but not
always for the objective: at a loose budget INT8's accuracy loss can cost more than the channels
it saves, and under an accuracy floor a wider precision may hold the floor with fewer channels
left. So the opening bisection runs once per candidate precision (the fastest, then the next
wider one) and keeps the better anchor for the objective: the most accurate under the budget,
or the fastest within the floor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agents.env import build_policy, decision_units, layer_shares
from agents.precisions import ordered_precisions, precision_factor, search_precision
from pipeline.core.choice import holds_floor
from pipeline.core.policy import Policy, Precision
from pipeline.core.space import SearchSpace

Trial = tuple[float, float | None, float | None]
"""A uniform keep ratio tried: (keep, measured latency, validation accuracy); None if failed."""

TOLERANCE = 0.01
"""A bracket narrower than this has converged: any further keep prunes to the same channels."""


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def read_trials(rows: list[list[Any]]) -> list[Trial]:
    """Saved trials (states saved before accuracies were kept have two fields)."""
    return [
        (float(row[0]), _float_or_none(row[1]), _float_or_none(row[2] if len(row) > 2 else None))
        for row in rows
    ]


def anchor_precisions(space: SearchSpace) -> list[Precision]:
    """The precisions worth a bisection: the one the original measured fastest in and, with a
    budget or an accuracy floor to bisect for, the next wider allowed one (narrower ones are
    no faster, so they could serve neither objective)."""
    fastest = search_precision(space)
    if space.budget_ms is None and space.accuracy_floor is None:
        return [fastest]
    allowed = ordered_precisions(space)  # fewest bits first
    wider = allowed[allowed.index(fastest) + 1 :] if fastest in allowed else []
    return [fastest, *wider[:1]]


class Bisection:
    """One bracket on the uniform keep ratio with every layer in `precision`.

    With a budget: the first keep ratio is the one whose estimated latency matches the budget
    (latency share of the prunable layers scaling with keep**2, since uniform pruning shrinks
    both the inputs and the outputs of inner layers); after that, bisection on the measured
    latency between the largest ratio known to meet the budget and the smallest known to miss
    it. With an accuracy floor: bisection on validation accuracy for the smallest ratio that
    holds it. Without either: a sweep of evenly spaced ratios from 1.0 down to min_keep.
    """

    def __init__(self, space: SearchSpace, precision: Precision) -> None:
        self.space, self.precision = space, precision
        self.units = decision_units(space)
        self.min_keep = float(min(max(space.min_keep, 1e-3), 1.0))
        # With a budget, met at low and missed at high; with an accuracy floor, held at high
        # and lost at low (the smallest keep that holds it is the fastest).
        self.low, self.high = self.min_keep, 1.0
        self.results: list[Trial] = []

    def policy(self, keep: float) -> Policy:
        keeps = [keep] * len(self.units)
        return build_policy(self.space, self.units, keeps, [self.precision] * len(self.units))

    def estimated_keep(self) -> float:
        """The keep ratio whose estimated latency equals the budget (1.0 without a budget)."""
        budget, original = self.space.budget_ms, self.space.original_latency_ms
        if budget and original:  # the unpruned model in this precision is the start
            original *= precision_factor(self.space, self.precision)
        if not budget or not original or budget >= original:
            return 1.0
        shares = layer_shares(self.space)
        prunable = sum(shares[x.name] for x in self.space.prunable)
        if prunable <= 0:
            return self.min_keep
        needed = (budget / original - (1.0 - prunable)) / prunable
        return float(np.clip(math.sqrt(max(needed, 0.0)), self.min_keep, 1.0))

    def next_keep(self, episodes: int) -> float | None:
        """The next keep ratio to evaluate (of `episodes` for a sweep), or None once converged."""
        floor = self.space.accuracy_floor
        if self.space.budget_ms is None and floor is None:
            steps = max(episodes - 1, 1)
            return 1.0 - (1.0 - self.min_keep) * min(len(self.results), steps) / steps
        if not self.results:
            return self.estimated_keep() if floor is None else (self.low + self.high) / 2.0
        if self.high - self.low < TOLERANCE:
            return None
        return (self.low + self.high) / 2.0

    def record(self, keep: float, latency: float | None, accuracy: float | None = None) -> None:
        """Narrow the bracket with a measured (or failed: None) keep ratio."""
        self.results.append((keep, latency, accuracy))
        floor, budget = self.space.accuracy_floor, self.space.budget_ms
        if floor is not None:
            if latency is not None and accuracy is not None and holds_floor(accuracy, floor):
                self.high = min(self.high, keep)
            else:  # lost the floor, or failed: look at larger networks
                self.low = max(self.low, keep)
                self.high = max(self.high, self.low)
            return
        if budget is None:
            return
        if latency is not None and math.isfinite(latency) and latency <= budget:
            self.low = max(self.low, keep)
        else:  # over budget, or failed: look at smaller networks
            self.high = min(self.high, keep)
            self.low = min(self.low, self.high)

    def best(self) -> Trial | None:
        """The trial found for the objective: the largest keep measured to meet the budget, or
        with a floor, the smallest that held it (and met any budget)."""
        floor, budget = self.space.accuracy_floor, self.space.budget_ms
        met = [t for t in self.results if t[1] is not None and (budget is None or t[1] <= budget)]
        if floor is None:
            return max(met, key=lambda t: t[0], default=None) if budget else None
        held = [t for t in met if t[2] is not None and holds_floor(t[2], floor)]
        return min(held, key=lambda t: t[0], default=None)

    def state(self) -> dict[str, Any]:
        return {"bracket": [self.low, self.high], "results": [list(r) for r in self.results]}

    def restore(self, state: dict[str, Any]) -> None:
        self.low, self.high = (float(x) for x in state["bracket"])
        self.results = read_trials(state["results"])


class AnchorSearch:
    """A bisection per anchor precision (`anchor_precisions`), run one after the other, each
    given an equal share of what the previous ones left; `anchor` is the better result."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.bisections = [Bisection(space, p) for p in anchor_precisions(space)]

    def next(self, episodes: int) -> tuple[Bisection, float] | None:
        """The bisection to run next and its keep ratio, within `episodes` candidates in all;
        None when every bisection has converged or used its share."""
        used = 0
        for index, bisection in enumerate(self.bisections):
            share = (episodes - used) // (len(self.bisections) - index)
            if len(bisection.results) < share:
                keep = bisection.next_keep(share)
                if keep is not None:
                    return bisection, keep
            used += len(bisection.results)
        return None

    def anchor(self) -> Bisection | None:
        """The bisection whose best trial serves the objective better: the fastest within an
        accuracy floor, else the most accurate under the budget (the faster on a tie)."""
        found = [(b, t) for b in self.bisections if (t := b.best()) is not None]
        if not found:
            return None
        if self.space.accuracy_floor is not None:
            return min(found, key=lambda bt: (bt[1][1], -(bt[1][2] or 0.0)))[0]
        return max(found, key=lambda bt: (bt[1][2] or 0.0, -(bt[1][1] or 0.0)))[0]

    def best_keep(self) -> float | None:
        anchor = self.anchor()
        best = anchor.best() if anchor else None
        return best[0] if best else None

    def precision(self) -> Precision:
        """The anchor's precision; before any anchor is known, the fastest."""
        anchor = self.anchor()
        return anchor.precision if anchor else search_precision(self.space)

    def trials(self) -> int:
        return sum(len(b.results) for b in self.bisections)

    def state(self) -> dict[str, Any]:
        return {b.precision.value: b.state() for b in self.bisections}

    def restore(self, state: dict[str, Any]) -> None:
        """From `state`; one saved before anchors (a single bracket) restores the first."""
        if "bracket" in state:
            state = {self.bisections[0].precision.value: state}
        for bisection in self.bisections:
            if bisection.precision.value in state:
                bisection.restore(state[bisection.precision.value])
