"""The run's search stage: measure the original, build the evaluator, let the agent search."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pipeline.core.artifacts import write_json
from pipeline.core.errors import ConfigError
from pipeline.core.files import CONFIG_MAX_BYTES, load_json
from pipeline.core.policy import Policy
from pipeline.core.records import RunRecord, SearchRecord
from pipeline.core.space import SearchSpace
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


def _budget(
    ctx: RunContext, original_ms: float, by_precision: dict[str, float], resume: bool
) -> float | None:
    """The budget in ms; a resumed search keeps the one it started with. The accuracy-floor
    objective has none unless one is given. `by_precision`: the original measured with every
    layer in each allowed precision (FP32 is the original itself)."""
    path = ctx.run_dir / SETUP
    if resume and path.is_file():
        setup = load_json(path, "search setup", ConfigError, CONFIG_MAX_BYTES)
        budget = setup.get("budget_ms") if isinstance(setup, dict) else None
        if budget is None and ctx.config.max_accuracy_drop is not None:
            return None  # the accuracy-floor objective, without a budget
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0:
            raise ConfigError(f"cannot resume: {path} is corrupt (no positive budget_ms)")
        return float(budget)
    budget = ctx.config.budget_ms or ctx.profile.budget_ms
    source = "given" if budget is not None else "none: the fastest within the accuracy floor"
    relative = budget is None and ctx.config.max_accuracy_drop is None
    if relative:
        budget, source = _derived_budget(ctx, original_ms, by_precision)
    write_json(
        path,
        {
            "budget_ms": budget,
            "budget_source": source,
            "budget_relative": relative,
            "original_latency_ms": original_ms,
            "precision_latency_ms": by_precision,
        },
    )
    return budget


def _budget_relative(ctx: RunContext) -> bool:
    """Whether the search's budget was derived from the original's latency (`_budget` says so
    in the search setup; a setup from before it said so counts as milliseconds given)."""
    setup = load_json(ctx.run_dir / SETUP, "search setup", ConfigError, CONFIG_MAX_BYTES)
    return isinstance(setup, dict) and setup.get("budget_relative") is True


def _derived_budget(
    ctx: RunContext, original_ms: float, by_precision: dict[str, float]
) -> tuple[float, str]:
    """`budget_fraction` x the original's latency: by default in its fastest precision, so the
    budget asks for pruning even where INT8 alone is several times faster than FP32."""
    fraction = ctx.config.search.budget_fraction
    if ctx.config.search.budget_basis == "fp32" or not by_precision:
        return fraction * original_ms, f"{fraction:g} x the original's measured latency"
    fastest = min(by_precision, key=lambda p: by_precision[p])
    return (
        fraction * by_precision[fastest],
        f"{fraction:g} x the original's measured latency in {fastest}, its fastest precision",
    )


def search_policy(ctx: RunContext, record: RunRecord) -> Policy | None:
    """The best policy under the budget, the closest one if allowed, else None."""
    from pipeline.search import policy_of

    sc = ctx.config.search
    base = _evaluator(ctx)
    budget = base.space.budget_ms
    problem = _feasibility(ctx, base) if budget is not None else None
    if problem and not sc.allow_over_budget:
        base.close()
        summary = {"agent": sc.agent, "episodes": 0, "infeasible": problem}
        record.search = SearchRecord(summary, budget, base.space.original_latency_ms)
        return None
    allowance = _allowance(ctx, base)  # after the budget check: the probe is a full fine-tune
    stage(f"searching with {sc.agent}: {sc.episodes} candidates, {objective_text(base.space)}")
    outcome, parallel = _run_agent(ctx, base)
    prune_in = outcome.prune_precision or _precision_of(base)
    summary = {
        **outcome.summary(),
        "objective": base.space.objective,
        "reward": sc.reward,
        "accuracy_floor": base.space.shipped_floor,
        "score_floor": base.space.accuracy_floor,
        "recovery_allowance": allowance,
        "precision_latency_ms": base.space.precision_latency_ms,
        "search_precision": prune_in,
        "latency_source": sc.latency_source,
        "parallel": parallel,
    }
    record.search = SearchRecord(
        summary,
        budget,
        base.space.original_latency_ms,
        [r for r in outcome.records if r["error"] is None],
        budget_relative=_budget_relative(ctx),
    )
    best = _confirmed_best(ctx, record, base, outcome)
    chosen = best or (outcome.closest if sc.allow_over_budget else None)
    goal = "within the floor" if base.space.accuracy_floor is not None else "under budget"
    summary["shipped"] = f"best {goal}" if best else ("closest" if chosen else None)
    if best is not None and _fills(ctx, base):
        return _filled(ctx, record, best)
    return policy_of(chosen) if chosen else None


def _fills(ctx: RunContext, base: CandidateEvaluator) -> bool:
    """Whether the pick is scaled to the budget's aim (`pipeline.run.fill`): under a budget
    alone, with latency measured (a FLOPs-driven search measures nothing, by design)."""
    sc = ctx.config.search
    measured = sc.latency_source == "measured"
    budget_alone = base.space.budget_ms is not None and base.space.accuracy_floor is None
    return measured and budget_alone and sc.budget_aim is not None


def _filled(ctx: RunContext, record: RunRecord, best: dict[str, Any]) -> Policy:
    """The confirmed pick scaled to sit within `search.budget_aim` x the budget."""
    from pipeline.run.fill import fill_budget
    from pipeline.search import policy_of

    summary = record.search.summary
    confirmed = [t for t in summary.get("confirmation") or [] if t["episode"] == best["episode"]]
    pick_ms = confirmed[-1]["confirmed_ms"] if confirmed else best["latency_ms"]
    search = record.search
    assert search.budget_ms is not None
    original_ms = search.original_ms if search.budget_relative else None
    policy, summary["fill"] = fill_budget(
        ctx, policy_of(best), pick_ms, search.budget_ms, original_ms
    )
    if summary["fill"]["scale"] is not None:
        summary["shipped"] = f"best under budget, scaled x{summary['fill']['scale']:.2f}"
    return policy


def objective_text(space: SearchSpace) -> str:
    """The search's objective in words, e.g. for the progress line."""
    budget = f"a budget of {space.budget_ms:.3f} ms" if space.budget_ms is not None else ""
    if space.accuracy_floor is None:
        return f"the most accurate under {budget}"
    floor = (
        f"the fastest losing at most {space.max_accuracy_drop * 100:.2f} points of validation "
        f"accuracy (floor {space.shipped_floor:.2%}"
        + (f", scores {space.accuracy_floor:.2%})" if space.recovery_allowance else ")")
    )
    return f"{floor} and meeting {budget}" if budget else floor


def _feasibility(ctx: RunContext, base: CandidateEvaluator) -> str | None:
    """Why the budget cannot be met by any candidate (`pipeline.run.feasibility`), or None.

    With --allow-over-budget the search still runs, to ship the closest candidate; the
    reason is shown, not acted on.
    """
    from pipeline.run.feasibility import describe, fastest_policy, infeasible

    space = base.space
    policy = fastest_policy(space, ctx.config.search.agent)
    what = describe(space, policy)
    stage(f"measuring the fastest candidate the search can build ({what})")
    try:
        stats, floor_ms = base.measure_untrained(policy)
    except Exception as exc:  # a model that cannot be pruned that far: candidates say so
        stage(f"it could not be built ({type(exc).__name__}); the budget is not checked first")
        return None
    statistic = ctx.profile.measure.statistic
    problem = infeasible(space.budget_ms, stats, floor_ms, statistic, what)
    if problem and ctx.config.search.allow_over_budget:
        stage(f"{problem}; searching for the closest candidate (--allow-over-budget)")
    return problem


def _precision_of(evaluator: CandidateEvaluator) -> str:
    from agents.env import search_precision

    return search_precision(evaluator.space).value


def _evaluator(ctx: RunContext) -> CandidateEvaluator:
    """The candidate evaluator, after measuring the original in each allowed precision."""
    from pipeline.search.build import build_evaluator
    from pipeline.search.measurements import MeasurementCache

    sc = ctx.config.search
    stage("measuring the original on the target and building the search space")
    evaluator = build_evaluator(
        ctx.original,
        ctx.splits,
        ctx.profile,
        ctx.run_dir / "original.onnx",
        candidate_spec(ctx),
        lambda original_ms, by_precision: _budget(ctx, original_ms, by_precision, ctx.resume),
        MeasurementCache(ctx.run_dir / "measurements.jsonl"),
        sc.timeout_s,
        latency_model=sc.latency_model,
        latency_source=sc.latency_source,
        max_accuracy_drop=_floor_drop(ctx),
    )
    measured = evaluator.space.precision_latency_ms
    stage(
        "the original with every layer in one precision: "
        + ", ".join(f"{p} {ms:.3f} ms" for p, ms in measured.items())
        + f"; channel searches run in {_precision_of(evaluator)}"
    )
    return evaluator


def _allowance(ctx: RunContext, base: CandidateEvaluator) -> dict[str, Any] | None:
    """Under an accuracy floor, what the full recovery adds to a candidate's score
    (`pipeline.search.allowance`), measured once and kept in the search setup for a resume;
    the evaluator's space takes it. None without a floor or with `recovery_allowance` off."""
    from pipeline.search.allowance import measure_allowance
    from pipeline.search.materialize import Recovery

    if base.space.accuracy_floor is None or not ctx.config.search.recovery_allowance:
        return None
    path = ctx.run_dir / SETUP
    setup = load_json(path, "search setup", ConfigError, CONFIG_MAX_BYTES)
    setup = setup if isinstance(setup, dict) else {}  # `_budget` wrote it; never trust a file
    probe = setup.get("recovery_allowance")
    if not isinstance(probe, dict) or not isinstance(probe.get("allowance"), float):
        stage("measuring what the full recovery adds to a candidate's score (one uniform probe)")
        spec = ctx.config.finetune.spec(ctx.config.seed)
        full = Recovery(spec, ctx.splits.train, ctx.original, "probe", ctx.config.show_progress)
        probe = measure_allowance(base, full)
        write_json(path, {**setup, "recovery_allowance": probe})
    base.use_space(dataclasses.replace(base.space, recovery_allowance=probe["allowance"]))
    stage(
        f"probe at keep {probe['probe_keep']:.2f}: {probe['candidate_score']:.2%} after the "
        f"candidates' fine-tune, {probe['full_recovery_score']:.2%} after the full one; "
        f"candidates must hold {base.space.accuracy_floor:.2%} "
        f"(the shipped floor {base.space.shipped_floor:.2%} less {probe['allowance']:.2%})"
    )
    return probe


def _floor_drop(ctx: RunContext) -> float | None:
    """The allowed validation accuracy drop (a fraction) under the floor objective."""
    drop = ctx.config.max_accuracy_drop
    return None if drop is None else drop / 100


def _run_agent(ctx: RunContext, base: CandidateEvaluator) -> tuple[SearchOutcome, Any]:
    """The agent's search, with several candidates in flight here or on a Ray cluster
    (`search.parallel`); returns the outcome and how the candidates were spread."""
    from pipeline.search import run_search
    from pipeline.search.parallel import describe, parallel_evaluator

    sc = ctx.config.search
    evaluator = parallel_evaluator(base, sc.parallel)
    try:
        outcome = run_search(
            evaluator,
            agent_name=sc.agent,
            reward_name=sc.reward,
            episodes=sc.episodes,
            run_dir=ctx.run_dir,
            seed=ctx.config.seed,
            checkpoint_every=sc.checkpoint_every,
            resume=ctx.resume,
            show_progress=ctx.config.show_progress,
        )
        return outcome, describe(evaluator)
    finally:
        evaluator.close()


def _confirmed_best(
    ctx: RunContext, record: RunRecord, base: CandidateEvaluator, outcome: SearchOutcome
) -> dict[str, Any] | None:
    """The search's best, re-measured (`pipeline.search.confirm`); a FLOPs-driven search measures
    nothing, by design, so its pick stands as it is."""
    if outcome.best is None or ctx.config.search.latency_source == "flops":
        return outcome.best
    if base.space.budget_ms is None and base.space.accuracy_floor is not None:
        best = _ranked_best(ctx, record, base, outcome)
    else:
        best = _budget_best(ctx, record, base, outcome)
    if best is not None and best is not outcome.best:
        record.search.summary["best_episode"] = best["episode"]
    return best


def _budget_best(
    ctx: RunContext, record: RunRecord, base: CandidateEvaluator, outcome: SearchOutcome
) -> dict[str, Any] | None:
    """The best candidate whose latency, measured again, still meets the budget."""
    from pipeline.search.confirm import confirm_pick

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
    record.search.summary["confirmation"] = tries
    return best


def _ranked_best(
    ctx: RunContext, record: RunRecord, base: CandidateEvaluator, outcome: SearchOutcome
) -> dict[str, Any] | None:
    """Under the floor alone, the fastest within it after its finalists are measured again
    side by side (`pipeline.search.confirm.rank_finalists`)."""
    from pipeline.core.choice import choose_best
    from pipeline.search.confirm import FINALIST_ROUNDS, rank_finalists

    stage(f"measuring the fastest candidates within the floor again ({FINALIST_ROUNDS} rounds)")
    ranked = rank_finalists(base, outcome.records)
    for r in sorted(ranked, key=lambda r: r["session_ms"]):
        stage(
            f"episode {r['episode']}: {r['session_ms']:.3f} ms side by side "
            f"(search measured {r['search_ms']:.3f} ms)"
        )
    record.search.summary["finalists"] = ranked
    return choose_best(outcome.records, 0.0, base.space.accuracy_floor)
