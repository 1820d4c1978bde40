"""report.json and manifest.json of a run, built from its `RunRecord`.

The key contract of report.json is DESIGN.md section 3 (pinned by `tests/unit/test_report_keys.py`);
report.md, pareto.png and the console table are rendered from it (`pipeline.run.report_render`).
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np

from pipeline.core.artifacts import atomic_write_text, sha256_file, versions, write_json
from pipeline.core.choice import holds_floor
from pipeline.core.records import LATENCY_KEYS, ModelFigures, RunRecord, SearchRecord
from pipeline.core.stats import (
    accuracy_interval,
    at_chance,
    chance_level,
    paired_difference,
    ratio_interval,
)
from pipeline.run.context import RunContext, console
from pipeline.run.report_render import print_summary, render_markdown, write_pareto
from pipeline.run.validate import TENSORRT_RUNTIMES

__all__ = ["build_summary", "print_summary", "render_markdown", "write_manifest", "write_report"]

DRIFT = 1.05  # the original measuring this much slower at the end than at the search's start


def write_manifest(ctx: RunContext, status: str, stages: list[str] | None = None) -> None:
    """What produced this run: versions, resolved profile and config, seeds, splits, hashes,
    and the stages done so far (`status` is running, failed..., or complete)."""
    files = {
        p.name: sha256_file(p)
        for p in sorted(ctx.run_dir.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json"
    }
    manifest = {
        "status": status,
        "stages_done": list(stages or []),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ctx.started)),
        "versions": versions(),
        "platform": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "system": platform.platform(),
        },
        "profile": ctx.profile.model_dump(mode="json"),
        "config": ctx.config.model_dump(mode="json"),
        "seed": ctx.config.seed,
        "model": ctx.model_info,
        "data": ctx.splits.record if ctx.splits is not None else None,
        "files": files,
    }
    write_json(ctx.run_dir / "manifest.json", manifest)


def _side(figures: ModelFigures) -> dict[str, Any]:
    lat = figures.latency
    return {
        "accuracy": figures.accuracy,
        "latency_ms": lat.summary() if lat else dict.fromkeys(LATENCY_KEYS),
        "params": figures.params,
        "macs": figures.macs,
        "size_bytes": figures.size_bytes,
        "rounds_ms": lat.rounds_ms if lat else None,
    }


def _drift(ctx: RunContext, record: RunRecord) -> str:
    """Why a budget met during the search can be missed at the end: the machine got slower.

    The original is measured both when the search starts and in the final comparison; when it
    too measures clearly slower at the end, the miss says so.
    """
    before = record.search.original_ms if record.search else None
    lat = record.original.latency
    after = lat.stat(ctx.profile.measure.statistic) if lat else None
    if not before or not after or after < DRIFT * before:
        return ""
    return (
        f" (the original also measured {after / before:.2f}x slower than when the search began:"
        " the target was slower during the final measurement; re-measure with `pipeline bench`)"
    )


def _gates(ctx: RunContext, record: RunRecord, summary: dict[str, Any]) -> dict[str, Any]:
    """Every check a deployable run must pass, with the reasons of those that failed."""
    failed = []
    if not summary["validation"]["passed"]:
        failed.append(
            "validation against the original failed: "
            + "; ".join(summary["validation"].get("reasons", []))
        )
    if summary["met_budget"] is False:
        failed.append(_budget_miss(ctx, record, summary))
    if summary["accuracy_drop"] > ctx.profile.max_accuracy_drop:
        whose = "the run's" if ctx.config.max_accuracy_drop is not None else "the profile's"
        failed.append(
            f"accuracy drop {summary['accuracy_drop']:.4f} exceeds {whose} "
            f"max_accuracy_drop {ctx.profile.max_accuracy_drop}"
        )
    check = record.precision_check
    if check and not check.not_slower and check.shipped != "fp32":
        failed.append(
            f"the policy's precisions run slower than FP32 on this target "
            f"({check.speedup:.2f}x); try another int8 scheme or FP32"
        )
    chance = _chance_gate(ctx, record)
    if chance:
        failed.append(chance)
    mismatched = (record.precision or {}).get("mismatched_layers")
    if mismatched:
        failed.append(
            f"{len(mismatched)} layers do not run in the policy's precision: "
            + ", ".join(mismatched[:5])
        )
    return {"passed": not failed, "failed": failed}


def _chance_gate(ctx: RunContext, record: RunRecord) -> str:
    """Why the run cannot be deployable when the original scores at chance on test (an
    untrained network, or data it was not trained for): no accuracy drop measured against it
    means anything. Empty when it is clearly better than guessing."""
    correct = record.original.correct
    if correct is None or ctx.splits is None or ctx.test is None or not len(correct):
        return ""
    chance = chance_level(ctx.test.labels, ctx.splits.num_classes)
    n, right = len(correct), int(np.asarray(correct).sum())
    if not at_chance(right, n, chance):
        return ""
    low, high = accuracy_interval(right, n).as_list()
    return (
        f"the original model scores at chance level on the test split ({right / n:.2%}, 95% "
        f"interval [{low:.2%}, {high:.2%}], chance {chance:.2%}): it looks untrained or not "
        "trained for this data; give its trained weights (--weights)"
    )


def _budget(ctx: RunContext, record: RunRecord) -> float | None:
    if record.search is not None:
        return record.search.budget_ms
    return ctx.config.budget_ms or ctx.profile.budget_ms


def _gate_budget(ctx: RunContext, record: RunRecord, budget: float | None) -> float | None:
    """The budget the final gate applies. Milliseconds given are judged as given. A budget
    derived from the original's latency (by default 0.6 x it in its fastest precision) is a
    ratio to the original: it is scaled by the original's latency in the final comparison,
    measured beside the deployed model, over its latency at the search's start. The target's
    speed drifts between sessions (7% over a nine-minute demo on a shared 2-core CPU), and a
    ratio read in one session does not."""
    lat = record.original.latency
    if budget is None or not _relative(record) or lat is None:
        return budget
    assert record.search is not None
    return budget * lat.stat(ctx.profile.measure.statistic) / record.search.original_ms


def _relative(record: RunRecord) -> bool:
    """Whether the run's budget is a ratio to the original (derived from its latency at the
    search's start, which was measured)."""
    search = record.search
    return search is not None and search.budget_relative and bool(search.original_ms)


def _budget_miss(ctx: RunContext, record: RunRecord, summary: dict[str, Any]) -> str:
    """The gate's line for a missed budget, with the drift it was judged under."""
    budget, gate = summary["budget_ms"], summary["budget_ms_at_gate"]
    deployed = summary["deployed"]["latency_ms"][ctx.profile.measure.statistic]
    if not _relative(record):
        return f"deployed latency misses the {budget} ms budget" + _drift(ctx, record)
    return (
        f"deployed latency {deployed:.4g} ms misses the budget: {gate:.4g} ms in the final "
        f"comparison ({budget:.4g} ms at the search's start, scaled by the original's latency "
        "measured beside the deployed model)"
    )


def build_summary(ctx: RunContext, record: RunRecord) -> dict[str, Any]:
    """The report.json document (keys are a stable contract)."""
    stat = ctx.profile.measure.statistic
    o, d = record.original, record.deployed
    assert o.latency is not None and d.latency is not None, "the measure stage comes first"
    budget = _budget(ctx, record)
    gate_budget = _gate_budget(ctx, record, budget)
    noisy = [k for k, side in (("original", o), ("deployed", d)) if side.latency.noisy]
    check = record.precision_check
    summary: dict[str, Any] = {
        "profile": ctx.profile.name,
        "runtime": ctx.profile.runtime,
        "statistic": stat,
        "original": _side(o),
        "deployed": _side(d),
        "speedup": o.latency.median / d.latency.median,
        "accuracy_drop": o.accuracy - d.accuracy,
        "budget_ms": budget,
        "budget_ms_at_gate": gate_budget,
        "met_budget": None if gate_budget is None else d.latency.stat(stat) <= gate_budget,
        "max_accuracy_drop": ctx.profile.max_accuracy_drop,
        "validation": record.validation,
        "search": record.search.summary if record.search else _fixed_search(ctx),
        "baselines": record.baselines,
        "precision_check": check.as_dict() if check else None,
        "engine": record.engine,
        "precision": record.precision,
        "floor": {"original": o.latency.floor(), "deployed": d.latency.floor()},
        "noisy_measurements": noisy,
        "latency_by_batch": [_batch_entry(entry) for entry in record.batches],
    }
    _add_intervals(record, summary)
    summary["gates"] = _gates(ctx, record, summary)
    if ctx.profile.runtime in TENSORRT_RUNTIMES:  # the build reproducible by hand on the device
        from exporters.trtexec import trtexec_commands

        summary["trtexec"] = trtexec_commands(ctx.run_dir / "model.onnx", ctx.profile)
    return summary


def _batch_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """One of `latency_by_batch`: the batch, each side's latency and throughput, the speedup."""
    sides = {
        key: {
            **{k: entry[key]["latency_ms"][k] for k in LATENCY_KEYS},
            "throughput_ips": entry[key]["throughput_ips"],
        }
        for key in ("original", "deployed")
    }
    return {"batch": entry["batch"], **sides, "speedup": entry["speedup"]}


def _add_intervals(record: RunRecord, summary: dict[str, Any]) -> None:
    """95% intervals on every accuracy and paired difference the report states, computed on
    the same test images, and on the speedup from the interleaved rounds (`pipeline.core.stats`)."""
    correct = record.correct()
    if "original" not in correct or "deployed" not in correct:
        return
    summary["test_images"] = len(correct["original"])
    for key in ("original", "deployed"):
        summary[key]["accuracy_ci95"] = _accuracy_ci(correct[key])
    drop = paired_difference(correct["original"], correct["deployed"])
    # the stated drop is a difference of two accuracies; the interval's exact bound can be that
    # same value, a rounding error away
    point = summary["accuracy_drop"]
    summary["accuracy_drop_ci95"] = [min(drop.low, point), max(drop.high, point)]
    summary["accuracy_drop_within_noise"] = drop.within_noise
    speedup = ratio_interval(summary["original"]["rounds_ms"], summary["deployed"]["rounds_ms"])
    summary["speedup_ci95"] = speedup.as_list() if speedup else None
    for name, side in summary["baselines"].items():
        if name in correct:
            side["accuracy_ci95"] = _accuracy_ci(correct[name])
            side["vs_deployed"] = paired_difference(correct["deployed"], correct[name]).as_dict()


def _accuracy_ci(correct: Any) -> list[float]:
    return accuracy_interval(int(correct.sum()), len(correct)).as_list()


def _fixed_search(ctx: RunContext) -> dict[str, Any]:
    """The `search` record of a run given a fixed policy (no search)."""
    return {
        "agent": "fixed",
        "policy": ctx.config.policy,
        "episodes": 0,
        "real_measurements": 0,
        "cached_measurements": 0,
        "predicted_measurements": 0,
        "wall_s": 0.0,
    }


def write_report(ctx: RunContext, record: RunRecord) -> dict[str, Any]:
    """report.json, report.md and pareto.png; returns the report.json document."""
    summary = build_summary(ctx, record)
    summary["wall_s"] = round(time.time() - ctx.started, 1)
    candidates = record.search.candidates if record.search else None
    write_pareto(ctx.run_dir / "pareto.png", summary, candidates)
    write_json(ctx.run_dir / "report.json", summary)
    atomic_write_text(ctx.run_dir / "report.md", render_markdown(summary))
    return summary


def write_no_candidate(ctx: RunContext, record: RunRecord, reason: str | None = None) -> None:
    """When no candidate meets the objective (or, with `reason`, none can): say so plainly, and
    which constraint failed; nothing is shipped."""
    search = record.search
    assert search is not None, "only a search can find no candidate"
    message = reason or no_candidate_message(search)
    write_json(
        ctx.run_dir / "report.json",
        {
            "profile": ctx.profile.name,
            "budget_ms": search.budget_ms,
            "met_budget": None if search.budget_ms is None else False,
            "search": search.summary,
            "message": message,
            "gates": {"passed": False, "failed": [message]},
        },
    )
    atomic_write_text(
        ctx.run_dir / "report.md",
        f"# Run report: {ctx.profile.name}\n\n**Verdict: NOT deployable.** {message}.\n",
    )
    console.print(f"[red]{message}[/]", soft_wrap=True)  # one line, however long


def no_candidate_message(search: SearchRecord) -> str:
    """Why nothing ships, in one line: the constraint no candidate met, and what to change."""
    # candidates are judged on their scores, against the floor less any recovery allowance
    floor = search.summary.get("score_floor", search.summary.get("accuracy_floor"))
    budget = search.budget_ms
    episodes, ran = search.summary.get("episodes"), search.candidates
    advice = "run more episodes, or pass --allow-over-budget to ship the closest candidate"
    if floor is None:
        closest = min((c["latency_ms"] for c in ran), default=None)
        fastest = "-" if closest is None else f"{closest:.3f} ms"
        return (
            f"no candidate met the {budget:.3f} ms budget in {episodes} episodes (fastest: "
            f"{fastest}); nothing was shipped. Raise the budget, {advice}"
        )
    held = sum(holds_floor(c["accuracy"], floor) for c in ran)
    if budget is None:
        best = max((c["accuracy"] for c in ran), default=None)
        top = "-" if best is None else f"{best:.2%}"
        return (
            f"no candidate held the {floor:.2%} validation accuracy floor in {episodes} episodes "
            f"(most accurate: {top}); nothing was shipped. Allow a larger --max-accuracy-drop, "
            f"{advice}"
        )
    met = sum(bool(c["meets_budget"]) for c in ran)
    return (
        f"infeasible: no candidate both held the {floor:.2%} validation accuracy floor and met "
        f"the {budget:.3f} ms budget in {episodes} episodes ({held} held the floor, {met} met "
        f"the budget); nothing was shipped. Relax one of them, {advice}"
    )
