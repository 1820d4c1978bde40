"""Baselines measured in the same run, on the same runner, as the deployed model.

- `uniform`: uniform pruning (FP32, the plain baseline) at the keep ratio whose measured
  latency matches the deployed model's, found by bisection on measured latency, then given the
  same full recovery fine-tune as the deployed model.
- `uniform_int8` (or `uniform_fp16`): the same in the precision the search pruned in, when that
  is not FP32 (the precision in which the whole original measured fastest): a hand-picked
  `uniform:R:int8` at matched latency, the harder baseline.
- `uniform_int8_at_accuracy` (`uniform_at_accuracy` when the search pruned in FP32, and both
  with `search.matched_accuracy_precisions: all`): uniform pruning in the search's precision at
  the least keep ratio whose test accuracy, after the same full fine-tune, is at least the
  deployed model's: how much faster the deployed model is at equal accuracy. Found by bisection
  between the matched-latency ratio and the unpruned original; `reached` is false when even the
  unpruned original in that precision is less accurate than the deployed model.
- `uniform_int8_at_floor` (or `uniform_at_floor`, as above), in place of `*_at_accuracy` when
  the search ran the accuracy-floor objective: uniform pruning at the least keep ratio that
  holds the same floor by the rule the deployed model shipped by (validation accuracy less the
  margin for the test set's noise; `pipeline.run.floor_rule.judge`), found the same way: how much
  faster the deployed model is than the best uniform policy allowed the same loss and chosen
  alike. Its test accuracy is reported beside, as the deployed model's is.
- `int8`: the unpruned original with every layer in INT8.

Once built, every baseline is measured together with the deployed model, interleaved in one
measuring session, so that each side's `deployed_speedup` (its latency over the deployed
model's) is a ratio from one session.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.core.choice import ROUNDING
from pipeline.core.policy import Precision, uniform_policy
from pipeline.core.records import Latency, RunRecord
from pipeline.core.stats import correct_of, ratio_interval
from pipeline.model.prune import count_macs_params
from pipeline.run.context import RunContext, stage
from pipeline.search.materialize import (
    Recovery,
    calibration,
    export_graph,
    latency_calibration,
    layer_precisions,
)
from pipeline.search.materialize import materialize as build

BASELINES = "baselines"  # folder of the run directory holding the baselines' ONNX graphs


def _export(
    ctx: RunContext, model: nn.Module, precision: Precision, path: Path, latency_only: bool = False
) -> None:
    """The graph in `precision`; INT8 calibrated as the profile asks, or on a subset when the
    graph is `latency_only` (measured, never scored)."""
    with tempfile.TemporaryDirectory() as tmp:
        if latency_only:
            calib = latency_calibration(ctx.splits, ctx.profile)
        else:
            calib = calibration(ctx.splits, ctx.profile.int8.calib_samples)
        precisions = layer_precisions(model, precision)
        fp32 = Path(tmp) / "fp32.onnx"
        export_graph(model, precisions, ctx.profile, path, calib, ctx.config.opset, fp32)


def _pruned(ctx: RunContext, keep: float, recovery: Recovery | None = None) -> nn.Module:
    policy = uniform_policy(ctx.original, keep, Precision.FP32)  # precisions go in at export
    return build(ctx.original, policy, ctx.profile, recovery).model


def _relative_latency(ctx: RunContext, path: Path, deployed: Path) -> float:
    """The graph's latency over the deployed model's, both measured in one session of one
    round: enough to steer the bisection, and the ratio, unlike a latency measured alone and
    compared with one measured minutes before, survives the machine's speed drifting."""
    measured = ctx.bench({"_deployed": deployed, "step": path}, rounds=1)
    statistic = ctx.profile.measure.statistic
    return (
        measured["step"]["latency_ms"][statistic] / measured["_deployed"]["latency_ms"][statistic]
    )


# A matched-latency baseline aims within this much of the deployed model's latency; the report
# flags one that could not get there (latency is a staircase in the keep ratio)
MATCH_TOLERANCE = 0.05
# Bisection points (closest first) measured again against the deployed model in one session
# of this many rounds: three rounds cannot tell a 5% gap on a machine whose speed drifts
MATCH_FINALISTS = 3
MATCH_ROUNDS = 10


def matched_keep_ratio(
    ctx: RunContext, precision: Precision, tmp: Path, deployed: Path, steps: int = 7
) -> float:
    """Bisection on measured latency for the uniform keep ratio matching the `deployed` graph's.

    Latency is a noisy staircase in the keep ratio (channels round to a multiple), and each
    bisection step is measured over one round only, beside the deployed graph. So the few
    ratios that came closest are measured again, interleaved with the `deployed` graph over
    `MATCH_ROUNDS` rounds, and the one whose latency is closest to the deployed model's in that
    session is returned.
    """
    low, high = ctx.profile.min_keep_ratio, 1.0
    tried: list[tuple[float, float, Path]] = []
    for i in range(steps):
        mid = (low + high) / 2
        path = tmp / f"bisect{i}.onnx"
        _export(ctx, _pruned(ctx, mid), precision, path, latency_only=True)
        relative = _relative_latency(ctx, path, deployed)
        tried.append((abs(relative - 1), mid, path))
        if relative <= 1:
            low = mid
        else:
            high = mid
    finalists = sorted(tried)[:MATCH_FINALISTS]
    if len(finalists) < 2:
        return finalists[0][1]
    return _closest_to(ctx, deployed, {ratio: path for _, ratio, path in finalists})


def _closest_to(ctx: RunContext, deployed: Path, finalists: dict[float, Path]) -> float:
    """Of `finalists` (keep ratio: graph), the one measured closest to `deployed`'s latency,
    all measured in one interleaved session of `MATCH_ROUNDS` rounds (each finalist judged by
    its typical per-round ratio to the deployed graph)."""
    from pipeline.core.stats import paired_ratio

    sides = {f"keep{i}": path for i, path in enumerate(finalists.values())}
    rounds = max(MATCH_ROUNDS, ctx.profile.measure.rounds)
    measured = ctx.bench({"_deployed": deployed, **sides}, rounds=rounds)
    target = measured["_deployed"]["rounds_ms"]
    gaps = {
        ratio: abs(paired_ratio(measured[name]["rounds_ms"], target) - 1)
        for ratio, name in zip(finalists, sides, strict=True)
    }
    return min(gaps, key=gaps.__getitem__)


def _describe(
    ctx: RunContext, record: RunRecord, model: nn.Module, path: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    """Test accuracy, size and work of a baseline's graph (named by its file); latency comes
    later, measured together with the deployed model. Its per-image correctness is kept for
    the report's paired intervals."""
    macs, params = count_macs_params(model, ctx.input_shape)
    correct = _test_correct(ctx, path)
    record.baseline_correct[path.stem] = correct
    return {
        "accuracy": float(correct.mean()),
        "params": params,
        "macs": macs,
        "size_bytes": path.stat().st_size,
        **extra,
    }


def _test_correct(ctx: RunContext, path: Path) -> np.ndarray:
    """(N,) bool: the test images the graph at `path` classifies right."""
    from exporters import run_onnx

    test = ctx.test
    return correct_of(run_onnx(path, test.inputs, threads=ctx.profile.threads), test.labels)


def _test_accuracy(ctx: RunContext, path: Path) -> float:
    return float(_test_correct(ctx, path).mean())


def _recovered(ctx: RunContext, keep: float, precision: Precision, path: Path) -> nn.Module:
    """Uniformly pruned at `keep`, given the deployed model's full recovery fine-tune,
    exported to `path` in `precision`."""
    label = f"uniform {precision.value} keep {keep:.3f}"
    spec = ctx.config.finetune.spec(ctx.config.seed)
    recovery = Recovery(spec, ctx.splits.train, ctx.original, label, ctx.config.show_progress)
    model = _pruned(ctx, keep, recovery)
    _export(ctx, model, precision, path)
    return model


def _uniform(
    ctx: RunContext, record: RunRecord, precision: Precision, tmp: Path, path: Path
) -> dict[str, Any]:
    """Uniform pruning in `precision` at the deployed model's latency, fully fine-tuned."""
    stage(
        f"baseline: uniform pruning in {precision.value} at the deployed model's measured "
        "latency (bisection)"
    )
    keep = matched_keep_ratio(ctx, precision, tmp, ctx.run_dir / "model.onnx")
    model = _recovered(ctx, keep, precision, path)
    return _describe(ctx, record, model, path, {"keep_ratio": keep, "precision": precision.value})


def accuracy_target(ctx: RunContext, record: RunRecord) -> tuple[str, float, str]:
    """The matched-accuracy baselines' name suffix, target test accuracy, and its words: the
    run's accuracy floor under the floor objective, else the deployed model's accuracy."""
    if record.search is not None and record.search.summary.get("accuracy_floor") is not None:
        floor = record.original.accuracy - ctx.profile.max_accuracy_drop
        return "_at_floor", floor, f"the accuracy floor on test ({floor:.2%})"
    return "_at_accuracy", record.deployed.accuracy, "the deployed model's test accuracy"


def _at_accuracy(
    ctx: RunContext,
    record: RunRecord,
    precision: Precision,
    matched: tuple[dict[str, Any], Path],
    unpruned: Path,
    tmp: Path,
    path: Path,
) -> dict[str, Any]:
    """Uniform pruning in `precision` at the least keep ratio reaching `accuracy_target`.

    Bisection between two points already known: the matched-latency ratio and the unpruned
    original (`unpruned`, in `precision`), each step judged by `_judge`. Of the ratios tried,
    the least one that reached the target is kept: with accuracy noisy in the keep ratio this
    errs towards a faster baseline, never a slower one. `steps` lists every judgement.
    """
    _, target, words = accuracy_target(ctx, record)
    judge, words = _judge(ctx, record, target, words)
    extra: dict[str, Any] = {"precision": precision.value, "target_accuracy": target, "steps": []}

    def reaches(keep: float, graph: Path) -> bool:
        verdict = judge(graph)
        extra["steps"].append({"keep_ratio": keep, **verdict})
        return bool(verdict["reaches"])

    side, matched_path = matched
    best: tuple[float, Path, Any]
    if reaches(side["keep_ratio"], matched_path):
        low, high = ctx.profile.min_keep_ratio, side["keep_ratio"]
        best = (high, matched_path, None)
    elif reaches(1.0, unpruned):
        low, high = side["keep_ratio"], 1.0
        best = (1.0, unpruned, ctx.original)
    else:
        shutil.copyfile(unpruned, path)
        extra |= {"keep_ratio": 1.0, "reached": False}
        return _describe(ctx, record, ctx.original, path, extra)
    steps = ctx.config.search.matched_accuracy_steps
    stage(
        f"baseline: uniform pruning in {precision.value} at {words} "
        f"({steps} bisection steps, each fully fine-tuned)"
    )
    for i in range(steps):
        mid = (low + high) / 2
        step = tmp / f"accuracy{i}.onnx"
        model = _recovered(ctx, mid, precision, step)
        if reaches(mid, step):
            high, best = mid, (mid, step, model)
        else:
            low = mid
    keep, source, model = best
    shutil.copyfile(source, path)
    if model is None:  # the matched-latency baseline itself: already described
        correct = record.baseline_correct
        correct[path.stem] = correct[matched_path.stem]
        return {**side, **extra, "reached": True}
    return _describe(ctx, record, model, path, {**extra, "keep_ratio": keep, "reached": True})


def _judge(
    ctx: RunContext, record: RunRecord, target: float, words: str
) -> tuple[Callable[[Path], dict[str, Any]], str]:
    """How a bisection step is judged, and the words for it. Under the accuracy floor, by the
    rule the deployed model shipped by (`pipeline.run.floor_rule.judge`: validation accuracy less
    the margin for the test set's noise), so both sides are chosen alike and neither on the
    test set; its test accuracy is recorded beside. Otherwise, by test accuracy reaching
    `target`."""
    from pipeline.run import floor_rule

    floor = (record.search.summary if record.search else {}).get("accuracy_floor")
    if floor is None:

        def on_test(graph: Path) -> dict[str, Any]:
            accuracy = _test_accuracy(ctx, graph)
            return {"test_accuracy": accuracy, "reaches": accuracy >= target - ROUNDING}

        return on_test, words
    original = floor_rule.val_correct(ctx, ctx.run_dir / "original.onnx")
    confidence, n_test = ctx.config.search.floor_confidence, len(ctx.splits.test)

    def on_validation(graph: Path) -> dict[str, Any]:
        verdict = floor_rule.judge(
            original, floor_rule.val_correct(ctx, graph), floor, n_test, confidence
        )
        return {
            **verdict,
            "test_accuracy": _test_accuracy(ctx, graph),
            "reaches": verdict["holds_floor"],
        }

    return (
        on_validation,
        f"the accuracy floor by the deployed model's rule ({floor:.2%} on validation)",
    )


def _measure_with_deployed(ctx: RunContext, baselines: dict[str, Any], kept: Path) -> None:
    """Every baseline and the deployed model in one interleaved measuring session."""

    stage(f"measuring the baselines with the deployed model, {ctx.profile.measure.rounds} rounds")
    sides = {name: kept / f"{name}.onnx" for name in baselines}
    measured = ctx.bench({"_deployed": ctx.run_dir / "model.onnx", **sides})
    deployed = Latency.from_bench(measured["_deployed"])
    for name, side in baselines.items():
        lat = Latency.from_bench(measured[name])
        side["latency_ms"] = lat.summary()
        side["deployed_speedup"] = lat.median / deployed.median
        ratio = ratio_interval(lat.rounds_ms, deployed.rounds_ms)
        side["deployed_speedup_ci95"] = ratio.as_list() if ratio else None
        if name.startswith("uniform") and not name.endswith(("_at_accuracy", "_at_floor")):
            side["latency_matched"] = abs(side["deployed_speedup"] - 1) <= MATCH_TOLERANCE


def _at_accuracy_wanted(ctx: RunContext, precision: Precision, searched: Precision) -> bool:
    """Whether the uniform baseline in `precision` also gets the equal-accuracy bisection: each
    step is a full fine-tune, so by default only the one in the search's precision does."""
    search = ctx.config.search
    if not search.matched_accuracy_steps:
        return False
    return search.matched_accuracy_precisions == "all" or precision == searched


def run_baselines(ctx: RunContext, record: RunRecord) -> None:
    """Fill `record.baselines` with the uniform and all-INT8 baselines."""

    baselines: dict[str, Any] = {}
    searched = Precision(record.search.summary.get("search_precision", "fp32"))
    default = ctx.profile.default_precision
    kept = ctx.run_dir / BASELINES  # the baselines' graphs, to re-measure them anywhere
    kept.mkdir(exist_ok=True)
    suffix = accuracy_target(ctx, record)[0]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if Precision.INT8 in ctx.profile.precisions:
            stage("baseline: the original with every layer in INT8")
            _export(ctx, ctx.original, Precision.INT8, kept / "int8.onnx")
            baselines["int8"] = _describe(
                ctx, record, ctx.original, kept / "int8.onnx", {"keep_ratio": 1.0}
            )
        # the unpruned original in each precision: the top of the matched-accuracy bisection
        unpruned = {
            Precision.FP32: ctx.run_dir / "original.onnx",
            Precision.INT8: kept / "int8.onnx",
        }
        for precision in dict.fromkeys([default, searched]):
            name = "uniform" if precision == default else f"uniform_{precision.value}"
            path = kept / f"{name}.onnx"
            baselines[name] = _uniform(ctx, record, precision, tmp, path)
            top = unpruned.get(precision)
            if _at_accuracy_wanted(ctx, precision, searched) and top is not None and top.is_file():
                baselines[name + suffix] = _at_accuracy(
                    ctx,
                    record,
                    precision,
                    (baselines[name], path),
                    top,
                    tmp,
                    kept / f"{name}{suffix}.onnx",
                )
        _measure_with_deployed(ctx, baselines, kept)
    record.baselines = baselines
