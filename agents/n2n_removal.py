"""Which of stage 1's removals N2N's shrinkage builds on, under each objective.

Stage 1 evaluates each removal once, at full width, with a short fine-tune. Which one stage 2
shrinks decides most of the result:

- Under an accuracy floor: the fastest removal whose score held the floor by FLOOR_ROOM of the
  allowed drop (`floor_removal`); the fastest that just holds it leaves nothing for shrinkage.
- Under a budget: the fastest removal whose score is within the final gate's allowed drop of
  the best removal's (`budget_removal`). Rated by the budget reward instead, latency decided
  alone (over the budget its penalty outweighs any score): on digits-hard at 0.6 x the
  unpruned INT8 model it chose three blocks removed on every seed, scoring up to 2.8 points
  below the best for a removal 1.5% faster, and tied uniform pruning on two seeds of three,
  where `layer3.1` + `layer4.1` removed (within the drop) beat it by half a point. Latency
  readings near each other decide it, and one reading each did not: on a shared 2-core CPU the
  same graph read 0.45 and 0.51 ms in two searches. So the fastest few are measured again in
  one interleaved session (`SideBySide`), under a floor as well: there, with the same scores,
  `layer3.1` + `layer4.1` read 0.422 ms and `layer2.1` + `layer4.1` 0.454 ms in one search and
  0.496 and 0.473 ms in another, and the second shrank the other removal and shipped a model
  1.6x slower than with its removals measured side by side (seed 1 of digits-hard). When the
  fastest removal of all scored below that drop, the removals that restore one of its blocks
  are worth a look first (`restorations`): on one seed stage 1 had tried three late blocks
  removed but not two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.core.policy import Policy
from pipeline.core.space import SearchSpace, SideBySide

Removal = tuple[str, ...]
Removals = dict[Removal, tuple[float, float]]
"""Stage 1's removals as evaluated: removed blocks -> (latency ms, validation score)."""

FLOOR_ROOM = 0.5  # under a floor, shrink on a removal scoring this share of the drop above it
REMOVAL_FINALISTS = 4  # removals measured again side by side


def _roomy(removals: Removals, space: SearchSpace) -> list[Removal]:
    """Under an accuracy floor, the removals whose score held it by FLOOR_ROOM of the allowed
    drop; [] without a floor."""
    floor, drop = space.accuracy_floor, space.max_accuracy_drop
    if floor is None or drop is None:
        return []
    need = floor + FLOOR_ROOM * drop
    return [r for r, (_, score) in removals.items() if score >= need]


def roomy_removal(removals: Removals, space: SearchSpace) -> Removal | None:
    """The fastest of `_roomy` by the search's readings; None without a floor or such a
    removal."""
    roomy = _roomy(removals, space)
    return min(roomy, key=lambda r: removals[r][0]) if roomy else None


def _within_drop(removals: Removals, space: SearchSpace) -> list[Removal]:
    """Removals whose score is within the gate's drop of the best score (all without one)."""
    top = max(score for _, score in removals.values())
    drop = space.gate_drop if space.gate_drop is not None else 1.0
    return [r for r, (_, score) in removals.items() if score >= top - drop]


def restorations(removals: Removals, space: SearchSpace, seen: set[Removal]) -> list[Removal]:
    """When the fastest removal scored below the gate's drop from the best, the removals that
    restore one of its blocks, not seen yet, in block order; [] otherwise."""
    if not removals:
        return []
    fastest = min(removals, key=lambda r: removals[r][0])
    if fastest in _within_drop(removals, space):
        return []
    subsets = [tuple(b for b in fastest if b != block) for block in fastest]
    return [r for r in subsets if r not in seen]


def budget_removal(
    removals: Removals,
    space: SearchSpace,
    policy_of: Callable[[Removal], Policy],
    evaluator: object,
) -> tuple[Removal, list[dict[str, Any]]]:
    """The fastest removal within the gate's drop of the best score, by `_fastest_again`."""
    return _fastest_again(_within_drop(removals, space), removals, policy_of, evaluator)


def floor_removal(
    removals: Removals,
    space: SearchSpace,
    policy_of: Callable[[Removal], Policy],
    evaluator: object,
) -> tuple[Removal, list[dict[str, Any]]] | None:
    """The fastest removal that held the floor with room (`_roomy`), by `_fastest_again`; None
    without a floor or such a removal."""
    roomy = _roomy(removals, space)
    return _fastest_again(roomy, removals, policy_of, evaluator) if roomy else None


def _fastest_again(
    candidates: list[Removal],
    removals: Removals,
    policy_of: Callable[[Removal], Policy],
    evaluator: object,
) -> tuple[Removal, list[dict[str, Any]]]:
    """The fastest of `candidates` (not empty) after the REMOVAL_FINALISTS fastest by their
    search readings are measured again side by side (when `evaluator` can); returns it and
    one entry per finalist (blocks, search and session latency, score)."""
    finalists = sorted(candidates, key=lambda r: removals[r][0])[:REMOVAL_FINALISTS]
    if len(finalists) < 2 or not isinstance(evaluator, SideBySide):
        return finalists[0], []
    again = evaluator.measure_side_by_side([policy_of(r) for r in finalists])
    entries: list[dict[str, Any]] = [
        {
            "removed": list(r),
            "search_ms": removals[r][0],
            "session_ms": ms,
            "score": removals[r][1],
        }
        for r, ms in zip(finalists, again, strict=True)
    ]
    best = min(entries, key=lambda e: e["session_ms"])
    return tuple(best["removed"]), entries
