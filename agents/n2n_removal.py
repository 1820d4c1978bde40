"""Which of stage 1's removals N2N's shrinkage builds on, under each objective.

Stage 1 evaluates each removal once, at full width, with a short fine-tune. Which one stage 2
shrinks decides most of the result:

- Under an accuracy floor: the fastest removal whose score held the floor by FLOOR_ROOM of the
  allowed drop (`roomy_removal`); the fastest that just holds it leaves nothing for shrinkage.
- Under a budget: the removal the run's reward rates best at the end of the search
  (`budget_removal`). During stage 1 the over-budget penalty still grows, so a removal drawn
  early earned more than the same removal drawn later; every removal is therefore rated again
  at the penalty's final weight. Over the budget that rating follows latency closely, and one
  reading each decided it: measured on a shared 2-core CPU, the same graph read 0.45 and
  0.51 ms in two searches, and the slower reading sent the shrinkage to a removal that tied
  uniform pruning where the faster one beat it by half a point. So the best few are measured
  again in one interleaved session (`SideBySide`) and rated on those latencies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.core.policy import Policy
from pipeline.core.space import CandidateResult, RewardFn, SearchSpace, SideBySide

Removal = tuple[str, ...]
Removals = dict[Removal, tuple[float, float]]
"""Stage 1's removals as evaluated: removed blocks -> (latency ms, validation score)."""

FLOOR_ROOM = 0.5  # under a floor, shrink on a removal scoring this share of the drop above it
REMOVAL_FINALISTS = 4  # under a budget, removals measured again side by side


def roomy_removal(removals: Removals, space: SearchSpace) -> Removal | None:
    """Under an accuracy floor, the fastest removal whose score held the floor by FLOOR_ROOM of
    the allowed drop; None without a floor or without such a removal."""
    floor, drop = space.accuracy_floor, space.max_accuracy_drop
    if floor is None or drop is None:
        return None
    need = floor + FLOOR_ROOM * drop
    roomy = [(ms, r) for r, (ms, score) in removals.items() if score >= need]
    return min(roomy)[1] if roomy else None


def budget_removal(
    removals: Removals,
    space: SearchSpace,
    reward: RewardFn,
    policy_of: Callable[[Removal], Policy],
    evaluator: object,
) -> tuple[Removal, list[dict[str, Any]]]:
    """The removal rated best by `reward` at the search's end, after the REMOVAL_FINALISTS best
    by their search readings are measured again side by side (when `evaluator` can); returns
    it and one entry per finalist (blocks, search and session latency, rating)."""

    def rating(removed: Removal, ms: float) -> float:
        result = CandidateResult(policy_of(removed), removals[removed][1], ms)
        return reward(result, space, 1.0)

    ranked = sorted(removals, key=lambda r: rating(r, removals[r][0]), reverse=True)
    finalists = ranked[:REMOVAL_FINALISTS]
    if len(finalists) < 2 or not isinstance(evaluator, SideBySide):
        return ranked[0], []
    again = evaluator.measure_side_by_side([policy_of(r) for r in finalists])
    entries = [
        {
            "removed": list(r),
            "search_ms": removals[r][0],
            "session_ms": ms,
            "rating": rating(r, ms),
        }
        for r, ms in zip(finalists, again, strict=True)
    ]
    best = max(entries, key=lambda e: e["rating"])
    return tuple(best["removed"]), entries
