"""Under the accuracy floor, step down from a pick that held it while the floor still holds.

Candidates are judged on scores after a short fine-tune; the full recovery adds the more
accuracy the harder a model is pruned, so a pick that held the floor once built in full usually
holds it with room to spare. Uniform pruning bisected with full fine-tunes uses that room; the
descent does the same along the pick's own shape: every layer's keep ratio (the head's aside) is
scaled by one factor, found by bisection, each step built in full and scored on validation.
One factor cannot shrink a layer that others hold back: with `search.descent_groups` set, a
second pass takes the layers in that many contiguous runs of about equal measured latency
(deepest first) and scales one run at a time by `GROUP_FACTOR`, kept when the floor still holds.
It is off by default: on `digits-hard` (seed 0) it took 2% more off (0.194 to 0.191 ms) for
four more full fine-tunes (docs/benchmarks.md).

Every model built in full, the pick and each step, is judged by `judge`: it holds the floor when
its validation drop plus `search.floor_confidence`'s quantile (one-sided, 0.9 by default) of the
drop's predictive error stays within the allowed drop. That error is the paired difference's
standard error on validation combined with the one the test set will add (its size scales it):
the final gate reads the test set's own estimate, and the bisection walks to the edge, where a
lucky validation score would otherwise ship a model that loses the floor on test. The pick and
every step that held are measured in one session (same runner); the fastest ships, built again
unless it is the last one built.
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
GROUP_FACTOR = 0.75  # the group pass scales one run of layers' keep ratios by this
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


def scaled(
    policy: Policy, scale: float, head: str, min_keep: float, only: set[str] | None = None
) -> Policy:
    """The policy with every keep ratio but the head's (or only those of `only`) multiplied by
    `scale` (at least `min_keep`); precisions and removed blocks unchanged."""
    layers = {
        name: action
        if name == head or (only is not None and name not in only)
        else LayerAction(max(min_keep, action.keep_ratio * scale), action.precision)
        for name, action in policy.layers.items()
    }
    return Policy(layers, policy.removed, policy.channel_scores)


def layer_groups(
    policy: Policy, shares: dict[str, float], head: str, count: int
) -> list[list[str]]:
    """The policy's live layers but the head, in forward order, cut into at most `count`
    contiguous runs of about equal latency share (equal numbers of layers if none is known)."""
    names = [
        n
        for n in policy.layers
        if n != head and not any(n.startswith(block + ".") for block in policy.removed)
    ]
    weights = [shares.get(n, 0.0) for n in names]
    if sum(weights) <= 0:
        weights = [1.0] * len(names)
    total, before, groups = sum(weights), 0.0, [[] for _ in range(count)]
    for name, weight in zip(names, weights, strict=True):
        # a layer joins the run its midpoint falls in
        groups[min(count - 1, int(count * (before + weight / 2) / total))].append(name)
        before += weight
    return [g for g in groups if g]


def descend(ctx: RunContext, record: RunRecord, floor: float) -> dict[str, Any]:
    """Bisect the scale on the built pick (`ctx.policy`), then shrink one run of layers at a time;
    leave the chosen model built. Returns what report.json records under `search.descent`."""
    pick = ctx.policy
    original = val_correct(ctx, ctx.run_dir / "original.onnx")
    confidence, n_test = ctx.config.search.floor_confidence, len(ctx.splits.test)
    head, min_keep = head_layer(ctx.original), ctx.profile.min_keep_ratio
    steps: list[dict[str, Any]] = []
    held: dict[str, Policy] = {"pick": pick}

    def attempt(policy: Policy, move: dict[str, Any]) -> bool:
        build(ctx, record, policy)
        correct = val_correct(ctx, ctx.run_dir / "model.onnx")
        step = {**move, **judge(original, correct, floor, n_test, confidence)}
        steps.append(step)
        stage(_step_line(step, floor))
        if step["holds_floor"]:
            name = f"step {len(steps)}"
            held[name] = policy
            shutil.copy(ctx.run_dir / "model.onnx", kept / f"{name}.onnx")
        return bool(step["holds_floor"])

    with tempfile.TemporaryDirectory() as tmp:
        kept = Path(tmp)
        shutil.copy(ctx.run_dir / "model.onnx", kept / "pick.onnx")
        low, high, best = LOWEST_SCALE, 1.0, pick
        for _ in range(ctx.config.search.descent_steps):
            scale = (low + high) / 2
            candidate = scaled(pick, scale, head, min_keep)
            if attempt(candidate, {"scale": round(scale, 4), "layers": "all"}):
                high, best = scale, candidate
            else:
                low = scale
        for group in reversed(_groups(ctx, best, head)):
            candidate = scaled(best, GROUP_FACTOR, head, min_keep, set(group))
            if attempt(candidate, {"scale": GROUP_FACTOR, "layers": _span(group)}):
                best = candidate
        outcome = _choose(ctx, record, held, kept)
    return {"steps": steps, **outcome}


def _groups(ctx: RunContext, policy: Policy, head: str) -> list[list[str]]:
    """`layer_groups` by the original's latency shares, measured on the target's runtime."""
    from pipeline.search.space import latency_shares

    count = ctx.config.search.descent_groups
    if count <= 0:
        return []
    shares = latency_shares(ctx.run_dir / "original.onnx", list(policy.layers), ctx.profile.threads)
    return layer_groups(policy, shares, head, count)


def _span(group: list[str]) -> str:
    return group[0] if len(group) == 1 else f"{group[0]} .. {group[-1]}"


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


def _step_line(step: dict[str, Any], floor: float) -> str:
    verdict = "holds" if step["holds_floor"] else "does not hold"
    where = "keep ratios" if step["layers"] == "all" else f"keep ratios of {step['layers']}"
    return (
        f"descent: {where} x{step['scale']:.2f} score {step['val_accuracy']:.2%} on validation "
        f"(less a margin of {step['margin']:.2%}): {verdict} the {floor:.2%} floor"
    )


def _choose(
    ctx: RunContext, record: RunRecord, held: dict[str, Policy], kept: Path
) -> dict[str, Any]:
    """Ship the fastest of the pick and the steps that held, measured in one session."""
    if len(held) == 1:
        build(ctx, record, held["pick"])
        return {"shipped": "pick", "shipped_step": None, "speedup_over_pick": None}
    stage(f"descent: measuring the pick and the {len(held) - 1} steps that held, side by side")
    sides = ctx.bench({name: kept / f"{name}.onnx" for name in held})
    statistic = ctx.profile.measure.statistic
    ms = {name: Latency.from_bench(side).stat(statistic) for name, side in sides.items()}
    fastest = min(ms, key=ms.__getitem__)
    if held[fastest] is not ctx.policy:  # the last model built is not the one that ships
        build(ctx, record, held[fastest])
    return {
        "shipped": "pick" if fastest == "pick" else "descended",
        "shipped_step": None if fastest == "pick" else int(fastest.split()[1]),
        "speedup_over_pick": ms["pick"] / ms[fastest],
        "measured_ms": ms,
    }
