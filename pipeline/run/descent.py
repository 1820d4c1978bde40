"""Under the accuracy floor, step down from a pick that held it while the floor still holds.

Candidates are judged on scores after a short fine-tune; the full recovery adds the more
accuracy the harder a model is pruned, so a pick that held the floor once built in full usually
holds it with room to spare. Uniform pruning bisected with full fine-tunes uses that room; the
descent does the same along the pick's own shape: every layer's keep ratio (the head's aside) is
scaled by one factor, found by bisection, each step built in full and scored on validation.

Every model built in full, the pick and each step, is judged by `judge`: it holds the floor when
its validation drop plus `search.floor_confidence`'s quantile (one-sided, 0.9 by default) of the
drop's predictive error stays within the allowed drop. That error is the paired difference's
standard error on validation combined with the one the test set will add (its size scales it):
the final gate reads the test set's own estimate, and the bisection walks to the edge, where a
lucky validation score would otherwise ship a model that loses the floor on test. The fastest
step that held ships if it measures faster than the pick (same runner, one session); otherwise
the pick is built again.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.policy import LayerAction, Policy, head_layer
from pipeline.core.records import Latency, RunRecord
from pipeline.run.context import RunContext, stage

LOWEST_SCALE = 0.4  # the bisection's lower end: every keep ratio at 40% of the pick's
Z95 = 1.959964  # the paired interval is a 95% one: its half-width is this many standard errors


def build(ctx: RunContext, record: RunRecord, policy: Policy) -> None:
    """Prune, recover and export `policy` in full: weights, model.onnx and policy.json."""
    from pipeline.run import stages
    from pipeline.run.export_stage import export_deployed

    ctx.policy = policy
    ctx.policy.save(ctx.run_dir / "policy.json")
    stages.compress(ctx, record)
    export_deployed(ctx, record)


def val_correct(ctx: RunContext, onnx_path: Path) -> np.ndarray:
    """(N,) bool: which validation images the ONNX model gets right."""
    from exporters import run_onnx
    from pipeline.core.stats import correct_of
    from pipeline.model.evaluate import stack

    inputs, labels = stack(ctx.splits.val)
    return correct_of(run_onnx(onnx_path, inputs, threads=ctx.profile.threads), labels)


def scaled(policy: Policy, scale: float, head: str, min_keep: float) -> Policy:
    """The policy with every keep ratio but the head's multiplied by `scale` (at least
    `min_keep`); precisions and removed blocks unchanged."""
    layers = {
        name: action
        if name == head
        else LayerAction(max(min_keep, action.keep_ratio * scale), action.precision)
        for name, action in policy.layers.items()
    }
    return Policy(layers, policy.removed, policy.channel_scores)


def descend(ctx: RunContext, record: RunRecord, floor: float) -> dict[str, Any]:
    """Bisect the scale on the built pick (`ctx.policy`); leave the chosen model built.
    Returns what report.json records under `search.descent`."""
    pick = ctx.policy
    original = val_correct(ctx, ctx.run_dir / "original.onnx")
    confidence, n_test = ctx.config.search.floor_confidence, len(ctx.splits.test)
    head, min_keep = head_layer(ctx.original), ctx.profile.min_keep_ratio
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        kept = {"pick": Path(tmp) / "pick.onnx", "descended": Path(tmp) / "descended.onnx"}
        shutil.copy(ctx.run_dir / "model.onnx", kept["pick"])
        low, high, best = LOWEST_SCALE, 1.0, None
        for _ in range(ctx.config.search.descent_steps):
            scale = (low + high) / 2
            build(ctx, record, scaled(pick, scale, head, min_keep))
            correct = val_correct(ctx, ctx.run_dir / "model.onnx")
            step = judge(original, correct, floor, n_test, confidence)
            steps.append({"scale": round(scale, 4), **step})
            stage(_step_line(scale, step, floor))
            if step["holds_floor"]:
                high, best = scale, ctx.policy
                shutil.copy(ctx.run_dir / "model.onnx", kept["descended"])
            else:
                low = scale
        outcome = _choose(ctx, record, pick, best, kept)
    return {"steps": steps, **outcome}


def judge(
    original: np.ndarray, correct: np.ndarray, floor: float, n_test: int, confidence: float
) -> dict[str, Any]:
    """Whether a model built in full holds the floor (a validation accuracy): its drop from the
    original, plus `confidence`'s one-sided quantile of the error predicting the test set's drop
    from it (both samples' standard errors; the test set's scaled from validation's by size),
    stays within the allowed drop, i.e. its accuracy less that margin reaches the floor."""
    from scipy.stats import norm

    from pipeline.core.stats import paired_difference

    diff = paired_difference(original, correct)  # original - model: the accuracy drop
    se = (diff.high - diff.low) / (2 * Z95)
    margin = float(norm.ppf(confidence)) * se * (1 + len(correct) / max(n_test, 1)) ** 0.5
    accuracy = float(correct.mean())
    return {
        "val_accuracy": accuracy,
        "standard_error": se,
        "margin": margin,
        "holds_floor": accuracy - margin >= floor,
    }


def _step_line(scale: float, step: dict[str, Any], floor: float) -> str:
    verdict = "holds" if step["holds_floor"] else "does not hold"
    return (
        f"descent: keep ratios x{scale:.2f} score {step['val_accuracy']:.2%} on validation "
        f"(less a margin of {step['margin']:.2%}): {verdict} the {floor:.2%} floor"
    )


def _choose(
    ctx: RunContext,
    record: RunRecord,
    pick: Policy,
    best: Policy | None,
    kept: dict[str, Path],
) -> dict[str, Any]:
    """Ship the fastest held step if it measures faster than the pick, else the pick."""
    if best is None:
        build(ctx, record, pick)
        return {"shipped": "pick", "speedup_over_pick": None}
    stage("descent: measuring the fastest step that held against the pick")
    sides = ctx.bench(kept)
    statistic = ctx.profile.measure.statistic
    ms = {name: Latency.from_bench(side).stat(statistic) for name, side in sides.items()}
    speedup = ms["pick"] / ms["descended"]
    shipped = best if speedup > 1.0 else pick
    if shipped is not ctx.policy:  # the last step built is not the one that ships
        build(ctx, record, shipped)
    return {"shipped": "descended" if shipped is best else "pick", "speedup_over_pick": speedup}
