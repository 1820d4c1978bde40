"""Before a search's pick ships, its latency is measured again the way the final gate measures it.

During the search each candidate is measured once. Near the budget one disturbed measurement
decides the pick: on a busy 2-core machine an N2N search shipped a candidate it had measured at
0.61 ms against a 0.68 ms budget, and the deployed model measured 0.82 ms. So the pick is
measured again, over the profile's rounds like the final comparison, before the final
fine-tune is spent on it. When it misses the budget now, the next best candidate is tried.

Under the accuracy floor with no budget the pick is the fastest candidate within the floor, and
among candidates a few percent apart one reading decides it: on a shared 2-core CPU a model's
single readings varied by 20% over two minutes (their ratio to the unpruned INT8 model's, read
beside them, by 13%). So the fastest few within the floor (`rank_finalists`) are measured again
in one interleaved session beside that unpruned model; their latencies become their per-round
ratio to it times its latency from the search's start, the scale every other candidate was
read on, and the pick and the floor's later tries follow them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.choice import choose_best, holds_floor

if TYPE_CHECKING:
    from pipeline.search.candidate import CandidateEvaluator

Bench = Callable[..., dict[str, dict[str, Any]]]
"""`RunContext.bench`: artifacts by name (and `rounds=`) to `bench_interleaved` results."""

# Picks re-measured at most: each try costs one interleaved measurement over the rounds.
MAX_TRIES = 3
FINALISTS = 6  # the fastest candidates within the floor, by the search's readings
FINALIST_ROUNDS = 10  # rounds of the finalists' session: a few-percent ordering, not a gate


def confirm_pick(
    evaluator: CandidateEvaluator,
    records: list[dict[str, Any]],
    resolution: float,
    bench: Bench,
    statistic: str,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The best candidate whose latency, measured again, still meets the budget.

    `bench` measures artifacts the way the final comparison does (`RunContext.bench`).
    Returns the record to ship (the search's own pick when no try confirms one: the final
    gate then reports the miss) and one entry per try for report.json.
    """
    from pipeline.search.loop import policy_of

    budget, floor = evaluator.space.budget_ms, evaluator.space.accuracy_floor
    first = choose_best(records, resolution, floor)
    if first is None or budget is None:
        return first, []
    remaining, tries = list(records), []
    for _ in range(MAX_TRIES):
        pick = choose_best(remaining, resolution, floor)
        if pick is None:
            break
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pick.onnx"
            evaluator.export_untrained(policy_of(pick), path)
            again = bench({"pick": path})["pick"]["latency_ms"][statistic]
        meets = again <= budget
        tries.append(
            {
                "episode": pick["episode"],
                "search_ms": pick["latency_ms"],
                "confirmed_ms": again,
                "meets_budget": meets,
            }
        )
        if meets:
            return pick, tries
        # Candidates with the same policy are the same graph: they would miss alike
        remaining = [r for r in remaining if r["policy"] != pick["policy"]]
    return first, tries


def finalists(records: list[dict[str, Any]], floor: float) -> list[dict[str, Any]]:
    """The `FINALISTS` fastest candidates that hold `floor` and met the budget, one per policy."""
    within = [
        r
        for r in records
        if r["meets_budget"] and r["error"] is None and holds_floor(r["accuracy"], floor)
    ]
    chosen: dict[str, dict[str, Any]] = {}
    for r in sorted(within, key=lambda r: (r["latency_ms"], -r["accuracy"])):
        chosen.setdefault(str(r["policy"]), r)  # the same policy is the same graph
    return list(chosen.values())[:FINALISTS]


def rank_finalists(
    evaluator: CandidateEvaluator, records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Measure the `finalists` again beside the unpruned model in the fastest precision, in one
    session of `FINALIST_ROUNDS` (`CandidateEvaluator.measure_side_by_side`); the `latency_ms`
    of every record of a finalist's policy becomes its per-round ratio to that model times the
    model's latency from the search's start (its reading kept as `search_ms`). Returns one
    entry per finalist for report.json; [] with fewer than two."""
    from pipeline.search.loop import policy_of

    space = evaluator.space
    chosen = finalists(records, space.accuracy_floor) if space.accuracy_floor is not None else []
    if len(chosen) < 2 or not space.precision_latency_ms:
        return []
    level = min(space.precision_latency_ms.values())
    again = evaluator.measure_side_by_side([policy_of(r) for r in chosen], FINALIST_ROUNDS)
    out, session = [], {}
    for r, ms in zip(chosen, again, strict=True):
        session[str(r["policy"])] = ms
        out.append(
            {
                "episode": r["episode"],
                "search_ms": r["latency_ms"],
                "ratio": ms / level,
                "session_ms": ms,
            }
        )
    for r in records:  # every record of a finalist's policy: the same graph
        if str(r["policy"]) in session:
            r.update(search_ms=r["latency_ms"], latency_ms=session[str(r["policy"])])
            r["source"] = "finalists"
    return out
