"""Under the accuracy floor, step down from a pick that held it while the floor still holds.

Candidates are judged on scores after a short fine-tune; the full recovery adds the more
accuracy the harder a model is pruned, so a pick that held the floor once built in full usually
holds it with room to spare. Uniform pruning bisected with full fine-tunes uses that room; the
descent does the same along the pick's own shape: its keep ratios (the head's aside) are scaled
down by a factor found by bisection, each step built in full and scored on validation.

The factors come from a ladder measured first (`_ladder`): the pick scaled by 0.95 down to 0.40,
each exported untrained (latency does not depend on the fine-tune) and measured beside the pick
in one session of `PROBE_ROUNDS`. Only rungs that measured faster than the pick and than every
wider rung are tried (channel counts round to a multiple, so neighbouring scales can be the
same model or a slower one), and the deepest rung that holds ships, at the speed the ladder
measured. Before, the steps that held were measured against the pick after the bisection, in
the profile's 3 rounds: on a 2-core CPU that session read a step (the pick x0.89) 27% slower
than the pick and shipped the pick; measured again over 20 rounds, the step was 13% faster.

Not every layer is worth shrinking: on a 2-core AMD CPU in INT8, a ResNet-18's last stage (2x2
pixels, large weights) costs three times the latency per share of its width of the middle ones
(`benchmarks/channel_steps.py`), and on a `digits-hard` model shrinking it by 0.7 saved 10%
for no measurable accuracy, while shrinking the first stage saved 1%. So with
`search.descent_groups: N` the pick's live layers are cut into N contiguous runs of about equal
latency, the pick with each run shrunk by `PROBE_FACTOR` is exported untrained and measured
beside the pick in one session, and each run is scaled by the ladder's factor raised to its
saving over the largest saving: a run that saves nothing is left as it is. It is off by default
(one factor for every layer): on `digits-hard` it has not yet been measured against one factor
from the same pick, and savings alone say nothing of a run's accuracy cost (docs/benchmarks.md).

Every model built in full, the pick and each step, is judged by `pipeline.run.floor_rule.judge`.
The shipped model is built again unless it is the last one built.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.policy import Policy, head_layer
from pipeline.core.records import RunRecord
from pipeline.run.context import RunContext, stage
from pipeline.run.floor_rule import judge, val_correct
from pipeline.run.scaling import export_untrained, scaled

LADDER = tuple(round(1.0 - 0.05 * i, 2) for i in range(1, 13))  # the pick x0.95 .. x0.40
MIN_SAVING = 0.02  # a rung must measure this much faster than the wider ones to be tried
PROBE_FACTOR = 0.7  # each run of layers is shrunk by this, untrained, to measure what it saves
PROBE_ROUNDS = 15  # the session's rounds: savings are a few percent, and 5 rounds read one at -4%


def build(ctx: RunContext, record: RunRecord, policy: Policy) -> None:
    """Prune, recover and export `policy` in full: weights, model.onnx and policy.json."""
    from pipeline.run import stages
    from pipeline.run.export_stage import export_deployed

    ctx.policy = policy
    ctx.policy.save(ctx.run_dir / "policy.json")
    stages.compress(ctx, record)
    export_deployed(ctx, record)


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
    """Bisect along the measured ladder (`_ladder`) from the built pick (`ctx.policy`); leave
    the chosen model built. Returns what report.json records under `search.descent`."""
    pick = ctx.policy
    original = val_correct(ctx, ctx.run_dir / "original.onnx")
    confidence, n_test = ctx.config.search.floor_confidence, len(ctx.splits.test)
    head = head_layer(ctx.original)
    steps: list[dict[str, Any]] = []

    def holds(rung: dict[str, Any]) -> bool:
        build(ctx, record, rung["policy"])
        correct = val_correct(ctx, ctx.run_dir / "model.onnx")
        move = {"scale": rung["scale"], "layers": "all", "ratio_to_pick": rung["ratio"]}
        steps.append({**move, **judge(original, correct, floor, n_test, confidence)})
        stage(_step_line(steps[-1], floor))
        return bool(steps[-1]["holds_floor"])

    with tempfile.TemporaryDirectory() as tmp:
        direction = _direction(ctx, pick, head, Path(tmp))
        ladder = _ladder(ctx, pick, head, _weights(direction), Path(tmp))
    rungs = [r for r in ladder if r["kept"]]
    low, high, held = -1, len(rungs), None  # rungs[low] holds (-1: the pick), rungs[high] not
    for _ in range(ctx.config.search.descent_steps):
        if high - low <= 1:
            break
        middle = (low + high) // 2
        if holds(rungs[middle]):
            low, held = middle, len(steps)
        else:
            high = middle
    out = {
        "steps": steps,
        "direction": direction,
        "ladder": [{k: v for k, v in r.items() if k != "policy"} for r in ladder],
    }
    if held is None:  # nothing held (or nothing to try): the pick ships
        if steps:
            build(ctx, record, pick)
        return {**out, "shipped": "pick", "shipped_step": None, "speedup_over_pick": None}
    if held != len(steps):  # the last model built is not the one that ships
        build(ctx, record, rungs[low]["policy"])
    speedup = 1.0 / rungs[low]["ratio"]
    return {**out, "shipped": "descended", "shipped_step": held, "speedup_over_pick": speedup}


def _ladder(
    ctx: RunContext, pick: Policy, head: str, weights: dict[str, float] | None, folder: Path
) -> list[dict[str, Any]]:
    """The pick scaled by each of `LADDER`'s factors, exported untrained and measured beside it
    in one session of `PROBE_ROUNDS`. A rung is `kept` when it measured `MIN_SAVING` faster
    than the pick and every wider rung kept (channel counts round to the profile's multiple,
    so neighbouring scales can give the same model or a slower one): the bisection, each step
    a full fine-tune, walks only down rungs that are faster on the target."""
    from pipeline.core.stats import paired_ratio

    stage(f"descent: measuring the pick scaled by {len(LADDER)} factors on the target")
    min_keep = ctx.profile.min_keep_ratio
    policies = {scale: scaled(pick, scale, head, min_keep, weights) for scale in LADDER}
    graphs = export_untrained(
        ctx, {"pick": pick, **{f"x{s}": p for s, p in policies.items()}}, folder
    )
    sides = ctx.bench(graphs, rounds=PROBE_ROUNDS)
    base = sides["pick"]["rounds_ms"]
    ratios = [paired_ratio(sides[f"x{scale}"]["rounds_ms"], base) for scale in policies]
    out = [
        {"scale": scale, "ratio": ratio, "kept": kept, "policy": policy}
        for (scale, policy), ratio, kept in zip(
            policies.items(), ratios, faster_rungs(ratios), strict=True
        )
    ]
    stage(
        "descent: "
        + ", ".join(
            f"x{r['scale']:.2f} {r['ratio']:.2f}{'' if r['kept'] else ' (skipped)'}" for r in out
        )
    )
    return out


def faster_rungs(ratios: list[float]) -> list[bool]:
    """Which rungs (latency over the pick's, widest first) measured at least `MIN_SAVING`
    faster than the pick and than every wider rung kept."""
    best, kept = 1.0, []
    for ratio in ratios:
        kept.append(ratio <= best * (1 - MIN_SAVING))
        best = ratio if kept[-1] else best
    return kept


def _direction(ctx: RunContext, pick: Policy, head: str, folder: Path) -> list[dict[str, Any]]:
    """Each run of layers (`_groups`) with what shrinking it alone by `PROBE_FACTOR` saved,
    as a share of the pick's latency, measured beside the pick in one session; [] when
    `search.descent_groups` is 0 or there is only one run."""
    from pipeline.core.stats import paired_ratio

    groups = _groups(ctx, pick, head)
    if len(groups) < 2:
        return []
    stage(f"descent: measuring what shrinking each of {len(groups)} runs of layers saves")
    min_keep = ctx.profile.min_keep_ratio
    policies = {
        f"run {i}": scaled(pick, PROBE_FACTOR, head, min_keep, dict.fromkeys(group, 1.0))
        for i, group in enumerate([[], *groups])
    }
    sides = ctx.bench(export_untrained(ctx, policies, folder), rounds=PROBE_ROUNDS)
    base = sides["run 0"]["rounds_ms"]
    out = []
    for i, group in enumerate(groups, 1):
        saving = 1.0 - paired_ratio(sides[f"run {i}"]["rounds_ms"], base)
        out.append({"layers": group, "factor": PROBE_FACTOR, "saving": saving})
    stage("descent: " + ", ".join(f"{_span(d['layers'])} saves {d['saving']:.1%}" for d in out))
    return out


def _weights(direction: list[dict[str, Any]]) -> dict[str, float] | None:
    """Each layer's power of the bisection's scale: its run's saving over the largest (none
    below 0); None (one factor for every layer) without runs or when none saved anything."""
    largest = max((d["saving"] for d in direction), default=0.0)
    if largest <= 0.0:
        return None
    for d in direction:
        d["weight"] = max(d["saving"], 0.0) / largest
    return {name: d["weight"] for d in direction for name in d["layers"]}


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


def _step_line(step: dict[str, Any], floor: float) -> str:
    verdict = "holds" if step["holds_floor"] else "does not hold"
    return (
        f"descent: keep ratios x{step['scale']:.2f} score {step['val_accuracy']:.2%} on validation "
        f"(less a margin of {step['margin']:.2%}): {verdict} the {floor:.2%} floor"
    )
