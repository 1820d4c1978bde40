"""The run's search stage: measure the original, build the evaluator, let the agent search."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from pipeline.core.artifacts import write_json
from pipeline.core.policy import Policy
from pipeline.core.train_spec import TrainSpec
from pipeline.run.context import RunContext, stage

if TYPE_CHECKING:
    from pipeline.search import SearchOutcome
    from pipeline.search.candidate import CandidateEvaluator

SETUP = "search_setup.json"


def candidate_spec(ctx: RunContext) -> TrainSpec:
    """The short recovery fine-tune each candidate gets (distilled like the final one)."""
    sc = ctx.config.search
    return dataclasses.replace(
        ctx.config.finetune.spec(ctx.config.seed),
        steps=sc.candidate_steps,
        bn_batches=sc.candidate_bn_batches,
    )


def _budget(ctx: RunContext, original_latency_ms: float, resume: bool) -> float:
    """The budget in ms; a resumed search keeps the one it started with."""
    path = ctx.run_dir / SETUP
    if resume and path.is_file():
        return json.loads(path.read_text())["budget_ms"]
    budget = ctx.config.budget_ms or ctx.profile.budget_ms
    source = "given"
    if budget is None:
        budget = ctx.config.search.budget_fraction * original_latency_ms
        source = f"{ctx.config.search.budget_fraction:g} x the original's measured latency"
    write_json(
        path,
        {"budget_ms": budget, "budget_source": source, "original_latency_ms": original_latency_ms},
    )
    return budget


def search_policy(ctx: RunContext, resume: bool) -> Policy | None:
    """The best policy under the budget, the closest one if allowed, else None."""
    from agents.env import search_precision
    from pipeline.search import policy_of, run_search
    from pipeline.search.candidate import MeasurementCache, build_evaluator
    from pipeline.search.parallel import describe, parallel_evaluator

    sc = ctx.config.search
    stage("measuring the original on the target and building the search space")
    evaluator = build_evaluator(
        ctx.original,
        ctx.splits,
        ctx.profile,
        ctx.run_dir / "original.onnx",
        candidate_spec(ctx),
        None,
        MeasurementCache(ctx.run_dir / "measurements.jsonl"),
        sc.timeout_s,
        latency_model=sc.latency_model,
        latency_source=sc.latency_source,
    )
    budget = _budget(ctx, evaluator.space.original_latency_ms, resume)
    evaluator.space = dataclasses.replace(evaluator.space, budget_ms=budget)
    ctx.results["budget_ms"] = budget
    ctx.results["search_original_ms"] = evaluator.space.original_latency_ms
    measured = evaluator.space.precision_latency_ms
    prune_in = search_precision(evaluator.space).value
    stage(
        "the original with every layer in one precision: "
        + ", ".join(f"{p} {ms:.3f} ms" for p, ms in measured.items())
        + f"; channel searches run in {prune_in}"
    )
    stage(
        f"searching with {sc.agent}: {sc.episodes} candidates, budget {budget:.3f} ms "
        f"({ctx.profile.measure.statistic})"
    )
    base = evaluator
    try:  # several candidates in flight, here or on a Ray cluster (search.parallel)
        evaluator = parallel_evaluator(base, sc.parallel)
        outcome = run_search(
            evaluator,
            agent_name=sc.agent,
            reward_name=sc.reward,
            episodes=sc.episodes,
            run_dir=ctx.run_dir,
            seed=ctx.config.seed,
            checkpoint_every=sc.checkpoint_every,
            resume=resume,
            show_progress=ctx.config.show_progress,
        )
        parallel = describe(evaluator)
    finally:
        evaluator.close()
    ctx.results["search"] = {
        **outcome.summary(),
        "precision_latency_ms": measured,
        "search_precision": prune_in,
        "latency_source": sc.latency_source,
        "parallel": parallel,
    }
    ctx.results["candidates"] = [r for r in outcome.records if r["error"] is None]
    best = _confirmed_best(ctx, base, outcome)
    chosen = best or (outcome.closest if sc.allow_over_budget else None)
    ctx.results["search"]["shipped"] = (
        "best under budget" if best else ("closest (over budget)" if chosen else None)
    )
    return policy_of(chosen) if chosen else None


def _confirmed_best(
    ctx: RunContext, base: CandidateEvaluator, outcome: SearchOutcome
) -> dict[str, Any] | None:
    """The search's best, re-measured (`pipeline.search.confirm`); a FLOPs-driven search measures
    nothing, by design, so its pick stands as it is."""
    from pipeline.search.confirm import confirm_pick

    if outcome.best is None or ctx.config.search.latency_source == "flops":
        return outcome.best
    stage(f"measuring the search's pick again ({ctx.profile.measure.rounds} rounds)")
    resolution = 1.0 / max(len(base.val_labels), 1)
    statistic = ctx.profile.measure.statistic
    best, tries = confirm_pick(base, outcome.records, resolution, ctx.bench, statistic)
    for t in tries:
        verdict = "meets" if t["meets_budget"] else "misses"
        stage(
            f"episode {t['episode']}: {t['confirmed_ms']:.3f} ms again (search measured "
            f"{t['search_ms']:.3f} ms), {verdict} the {base.space.budget_ms:.3f} ms budget"
        )
    ctx.results["search"]["confirmation"] = tries
    if best is not outcome.best:
        ctx.results["search"]["best_episode"] = best["episode"]
    return best
