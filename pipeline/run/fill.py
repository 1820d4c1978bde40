"""Under a budget, scale the search's pick along its own shape until it sits at the budget's aim.

The search scores candidates after a short fine-tune and its agents move keep ratios in coarse
bins, so the most accurate candidate under the budget can run well under it (N2N picks on
`digits-hard` shipped at 58% and 72% of their budgets on a 2-core CPU): time left unused is
accuracy left unused, since a wider model of the same shape is, after the same full recovery,
at least as accurate in expectation. A pick at the budget's edge fails the other way: the final
gate measures the built model again, in another session, and a pick confirmed at 95% of its
budget read 0.5% over it.

So the pick's keep ratios (the head's aside, removed blocks and precisions unchanged) are
scaled, up by `WIDER`'s factors when it measured under the aim, `search.budget_aim` x the
budget, and down by `NARROWER`'s when over it; each scaled graph is exported untrained (latency
does not depend on the fine-tune) and measured beside the pick in one session of `ROUNDS`. A
rung's latency is its per-round ratio to a reference in that session times the reference's
latency: under a budget derived from the original (the default), the original itself at its
latency when the search began, the scale the final gate judges such a budget on; under
milliseconds given, the pick at its confirmed latency. (Anchored on the pick's 3-round
confirmation, a demo read its pick 11% under the search's reading, widened it x2.25 to an
estimated 0.390 ms against an aim of 0.404, and the model measured 0.50 ms at the gate.)
Widening walks up while rungs stay within the aim and ships the last; narrowing ships the
first rung within it (the pick itself when none is).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.policy import Policy, head_layer
from pipeline.run.context import RunContext, stage
from pipeline.run.scaling import export_untrained, scaled

WIDER = (1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5, 1.65, 1.8, 2.0, 2.25, 2.5, 3.0)
NARROWER = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
ROUNDS = 15  # as the descent's ladder: steps of a few percent need more than the gate's rounds


def fill_budget(
    ctx: RunContext, pick: Policy, pick_ms: float, budget_ms: float, original_ms: float | None
) -> tuple[Policy, dict[str, Any]]:
    """The pick scaled to sit within `search.budget_aim` x the budget (the pick itself when no
    rung does better), and what report.json records under `search.fill`. `original_ms`: the
    original's latency at the search's start when the budget is a ratio to it (rungs are then
    read against the original), else None (read against the pick at `pick_ms`)."""
    aim = ctx.config.search.budget_aim
    assert aim is not None
    target = aim * budget_ms
    out: dict[str, Any] = {"pick_ms": pick_ms, "target_ms": target, "ladder": [], "scale": None}
    wider = pick_ms < target
    rungs = _rungs(ctx, pick, WIDER if wider else NARROWER)
    if not rungs:
        return pick, out
    stage(
        f"{'widening' if wider else 'narrowing'} the pick ({pick_ms:.3f} ms) towards "
        f"{target:.3f} ms ({aim:g} x the budget): {len(rungs)} scales measured beside it, "
        f"{ROUNDS} rounds"
    )
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_untrained(ctx, {"pick": pick, **rungs}, Path(tmp))
        if original_ms is not None:
            graphs["original"] = ctx.run_dir / "original.onnx"
        sides = ctx.bench(graphs, rounds=ROUNDS)
    anchor = ("original", original_ms) if original_ms is not None else ("pick", pick_ms)
    out["ladder"] = ladder = _ladder(sides, list(rungs), anchor, target, wider)
    out["anchor"], out["pick_session_ms"] = anchor[0], _read(sides, "pick", anchor)
    stage("scaled: " + ", ".join(f"{r['name']} {r['ms']:.3f} ms" for r in ladder))
    chosen = [r for r in ladder if r["chosen"]]
    if not chosen:
        return pick, out
    (best,) = chosen
    out.update(scale=best["scale"], ms=best["ms"])
    stage(f"shipping the pick scaled {best['name']}: {best['ms']:.3f} ms by that session")
    return rungs[best["name"]], out


def _rungs(ctx: RunContext, pick: Policy, factors: tuple[float, ...]) -> dict[str, Policy]:
    """The pick scaled by each factor, by name ('x1.10'), until scaling changes nothing more
    (every layer at keep 1, or at the least keep)."""
    head, min_keep = head_layer(ctx.original), ctx.profile.min_keep_ratio
    rungs: dict[str, Policy] = {}
    last = pick.to_dict()
    for scale in factors:
        policy = scaled(pick, scale, head, min_keep)
        if policy.to_dict() == last:
            break
        rungs[f"x{scale:.2f}"], last = policy, policy.to_dict()
    return rungs


def _ladder(
    sides: dict[str, dict[str, Any]],
    names: list[str],
    anchor: tuple[str, float],
    target: float,
    wider: bool,
) -> list[dict[str, Any]]:
    """Each rung's latency (`_read` against `anchor`), whether it is within `target`, and
    which one ships: widening, the last of the rungs within it before the first over it;
    narrowing, the first within it."""
    out = []
    for name in names:
        ms = _read(sides, name, anchor)
        out.append({"name": name, "scale": float(name[1:]), "ms": ms, "within": ms <= target})
    within = [r["within"] for r in out]
    if wider:
        last = within.index(False) - 1 if False in within else len(out) - 1
    else:
        last = within.index(True) if True in within else -1
    for i, r in enumerate(out):
        r["chosen"] = i == last
    return out


def _read(sides: dict[str, dict[str, Any]], name: str, anchor: tuple[str, float]) -> float:
    """A side's latency: its per-round ratio to the anchor side's times the anchor's latency
    (`anchor`: the side's name and that latency)."""
    from pipeline.core.stats import paired_ratio

    return paired_ratio(sides[name]["rounds_ms"], sides[anchor[0]]["rounds_ms"]) * anchor[1]
