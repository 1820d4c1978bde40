"""Under the accuracy-floor objective, the search's pick must hold the floor once built in full.

A candidate is scored after a short fine-tune; the deployed model gets the full recovery
fine-tune (and INT8 recovery), which usually gains accuracy but need not. So model.onnx is
scored on the validation split and judged with a margin for the test set
(`pipeline.run.floor_rule.judge`); when it loses the floor, the next-fastest candidate that held it
during the search is built instead, a bounded number of times. report.json lists the tries.
A pick that holds is then stepped down while the floor still holds (`pipeline.run.descent`).
When no try holds, the one that came closest ships (the final gate then judges it on test):
the later tries are chosen for their higher scores, yet built in full they have scored lower
than the first (on one `digits-hard` seed 90.71%, 90.16% and 90.56% against a 90.44% floor,
the first missing by 0.06 points and the fastest).
"""

from __future__ import annotations

from typing import Any

from pipeline.core.choice import choose_best
from pipeline.core.records import RunRecord
from pipeline.run.context import RunContext, stage

MAX_TRIES = 3  # each try is a full recovery fine-tune and export


def applies(ctx: RunContext, record: RunRecord) -> bool:
    return record.search is not None and record.search.summary.get("accuracy_floor") is not None


def hold_floor(ctx: RunContext, record: RunRecord) -> None:
    """Check the built model against the floor on validation; rebuild with the next candidate
    while it misses (`MAX_TRIES` in all); descend from the one that holds."""
    from pipeline.run import descent, floor_rule
    from pipeline.search import policy_of

    summary = record.search.summary
    floor = summary["accuracy_floor"]
    tried: list[dict[str, Any]] = []
    episode = summary.get("best_episode")
    original = floor_rule.val_correct(ctx, ctx.run_dir / "original.onnx")
    confidence, n_test = ctx.config.search.floor_confidence, len(ctx.splits.test)
    while True:
        correct = floor_rule.val_correct(ctx, ctx.run_dir / "model.onnx")
        judged = floor_rule.judge(original, correct, floor, n_test, confidence)
        holds = judged["holds_floor"]
        tried.append({"episode": episode, **judged})
        stage(
            f"built in full, episode {episode} scores {judged['val_accuracy']:.2%} on "
            f"validation (less a margin of {judged['margin']:.2%}): "
            f"{'holds' if holds else 'LOSES'} the {floor:.2%} floor"
        )
        following = _next_pick(record, tried)
        if holds or following is None or len(tried) >= MAX_TRIES:
            break
        episode = following["episode"]
        descent.build(ctx, record, policy_of(following))
    if not holds and (closest := closest_try(tried)) != episode:
        stage(f"no try held the floor: shipping episode {closest}, the closest to it")
        episode = closest
        descent.build(ctx, record, policy_of(_candidate(record, closest)))
    summary["floor_tries"] = tried
    summary["best_episode"] = episode
    if holds and ctx.config.search.descent_steps > 0:
        summary["descent"] = descent.descend(ctx, record, floor)


def closest_try(tried: list[dict[str, Any]]) -> int:
    """The episode of the try whose validation accuracy less its margin came highest."""
    return max(tried, key=lambda t: t["val_accuracy"] - t["margin"])["episode"]


def _candidate(record: RunRecord, episode: int) -> dict[str, Any]:
    return next(c for c in record.search.candidates if c["episode"] == episode)


def _next_pick(record: RunRecord, tried: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The next-fastest candidate that held the floor during the search, not yet built."""
    done = {t["episode"] for t in tried}
    rest = [c for c in record.search.candidates if c["episode"] not in done]
    policies = {str(c["policy"]) for c in record.search.candidates if c["episode"] in done}
    rest = [c for c in rest if str(c["policy"]) not in policies]  # the same model again
    return choose_best(rest, 0.0, _score_floor(record, tried))


def _score_floor(record: RunRecord, tried: list[dict[str, Any]]) -> float:
    """The score the next try needs: the search's, raised after a miss so that the least
    full-recovery gain seen so far still takes it to the shipped floor."""
    summary = record.search.summary
    floor = summary["accuracy_floor"]
    needed = summary.get("score_floor", floor)
    scores = {c["episode"]: c["accuracy"] for c in record.search.candidates}
    gains = [t["val_accuracy"] - scores[t["episode"]] for t in tried if t["episode"] in scores]
    return max(needed, floor - min(gains)) if gains else needed
