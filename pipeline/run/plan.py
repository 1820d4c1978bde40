"""The run's plan: its stages in order, and `execute`, which walks them and keeps
`manifest.json` up to date after each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.artifacts import check_out_dir, new_run_dir
from pipeline.core.config import RunConfig
from pipeline.core.errors import RuntimeNotAvailable
from pipeline.core.profile import TargetProfile, with_input_shape
from pipeline.core.records import RunRecord
from pipeline.run import floor_stage, report, stages
from pipeline.run.context import RunContext, console
from pipeline.run.export_stage import export_deployed

EXPORTED_ONLY = "stopped: exported, runtime not available here"


@dataclass(frozen=True)
class Stage:
    """One step of a run. `run` returns a manifest status to stop the run early (a failed
    run that still writes its report), or None to go on; `applies` skips it when false."""

    name: str
    run: Callable[[RunContext, RunRecord], str | None]
    applies: Callable[[RunContext, RunRecord], bool] = lambda ctx, record: True


def _searching(ctx: RunContext, record: RunRecord) -> bool:
    return ctx.config.policy is None


def _local_tensorrt(ctx: RunContext, record: RunRecord) -> bool:
    return ctx.profile.runtime == "tensorrt" and ctx.profile.device == "local"


def _runtime_missing(ctx: RunContext, record: RunRecord) -> bool:
    return ctx.runtime_missing is not None


def _with_baselines(ctx: RunContext, record: RunRecord) -> bool:
    return record.search is not None and ctx.config.search.baselines


STAGES: tuple[Stage, ...] = (
    Stage("baseline", stages.baseline),
    Stage("search", stages.search, _searching),
    Stage("compress", stages.compress),
    Stage("export", export_deployed),
    Stage("no runtime", stages.stop_without_runtime, _runtime_missing),
    Stage("floor", floor_stage.hold_floor, floor_stage.applies),
    Stage("engine", stages.build_engine, _local_tensorrt),
    Stage("measure", stages.measure),
    Stage("validate", stages.validate),
    Stage("baselines", stages.baselines, _with_baselines),
    Stage("report", stages.write_report),
)


def execute(
    profile: TargetProfile, config: RunConfig, run_dir: Path | None = None, resume: bool = False
) -> int:
    """Run every stage; return the exit code (0 deployable, 1 a gate failed)."""
    if config.max_accuracy_drop is not None:  # the run's floor is every gate's, QAT's included
        profile = profile.model_copy(update={"max_accuracy_drop": config.max_accuracy_drop / 100})
    profile = with_input_shape(profile, config.input_shape)
    ctx = RunContext(profile, config, Path(), resume=resume)
    if run_dir is None:
        check_out_dir(config.out)  # before loading and training anything
    stages.load_inputs(ctx)  # bad input fails here, before a run directory exists
    ctx.run_dir = run_dir or new_run_dir(config.out, profile.name)
    console.print(f"run directory: [bold]{ctx.run_dir}[/]")
    if ctx.policy is not None:
        ctx.policy.save(ctx.run_dir / "policy.json")
    record, done = RunRecord(), []
    report.write_manifest(ctx, "running", done)
    try:
        for step in STAGES:
            if not step.applies(ctx, record):
                continue
            stopped = step.run(ctx, record)
            done.append(step.name)
            report.write_manifest(ctx, stopped or "running", done)
            if stopped:
                return 1
    except BaseException as exc:
        exported = isinstance(exc, RuntimeNotAvailable) and ctx.runtime_missing is not None
        report.write_manifest(ctx, EXPORTED_ONLY if exported else "failed", done)
        raise
    finally:
        ctx.close()
    report.write_manifest(ctx, "complete", done)
    summary = record.report
    report.print_summary(console, summary)
    return 0 if summary["gates"]["passed"] else 1
