"""`pipeline bench`'s measurement: in a measuring process with a timeout, so a runtime that
hangs cannot hold the command. Apart from `bench`, which the measuring process itself runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.core.profile import TargetProfile
from pipeline.measure.bench import (
    RUN_DIR_MODELS,
    bench_run_dir,
    format_bench,
    format_bench_run,
    run_dir_models,
)
from pipeline.measure.measure_worker import MeasureWorker
from pipeline.measure.runners.registry import check_runtime


def bench_command(
    profile: TargetProfile, target: Path, timeout_s: float, batches: Sequence[int] | None
) -> tuple[dict[str, Any], Table]:
    """`pipeline bench`: the result (its JSON) and the table to print; per batch size when
    `batches` is given (`bench_per_batch`), else at the profile's batch (`bench_with_timeout`).
    """
    if batches:
        from pipeline.measure.batches import format_batches

        result = bench_per_batch(profile, target, batches, timeout_s)
        return result, format_batches(result)
    result = bench_with_timeout(profile, target, timeout_s)
    # a run directory gives both models side by side, with the speedup
    return result, format_bench_run(result) if "speedup" in result else format_bench(result)


def bench_with_timeout(profile: TargetProfile, target: Path, timeout_s: float) -> dict[str, Any]:
    """`pipeline bench`: an artifact (`bench_artifact`) or a run directory (`bench_run_dir`)
    measured in a child process that is killed after `timeout_s` per measurement, so a runtime
    that hangs cannot hold the command.

    Raises:
        ModelError, RuntimeNotAvailable: The artifact cannot be used (checked here first).
        ConfigError: A run directory lacks one of its two models.
        MeasurementError: A measurement timed out, crashed or beat the physical floor.
    """
    target = Path(target)
    is_run_dir = os.path.isdir(target)  # False, not an error, for paths the OS refuses
    paths = [target / name for name in RUN_DIR_MODELS.values()] if is_run_dir else [target]
    runner = check_runtime(profile)
    for path in paths:
        if is_run_dir and not path.is_file():
            break  # bench_run_dir names what the folder lacks
        runner(path, profile)  # the file and its suffix, before a process starts
    with MeasureWorker(profile, timeout_s, typed_errors=True) as worker:
        if is_run_dir:
            return bench_run_dir(profile, target, worker.measure)
        return worker.measure(target)


def bench_per_batch(
    profile: TargetProfile, target: Path, batches: Sequence[int], timeout_s: float
) -> dict[str, Any]:
    """`pipeline bench --batch`: an artifact, or a run directory's original and deployed
    models, at each batch size, interleaved over the profile's `measure.rounds`, each batch in
    a measuring process killed after `timeout_s` per measurement.

    Returns:
        `artifact` (the file or the run directory), `runtime`, `threads`, `rounds`, `models`
        (the keys of each entry's sides: `model`, or `original` and `deployed`) and `batches`
        (`pipeline.measure.batches.bench_batches`).

    Raises:
        ConfigError: A graph with a static batch asked for another, or a run directory that
            lacks one of its models.
        Same as `bench_with_timeout`.
    """
    from pipeline.measure.batches import batch_workers, bench_batches, check_batches

    target = Path(target)
    artifacts = _artifacts(target)
    runner = check_runtime(profile)
    for path in artifacts.values():
        runner(path, profile)  # the file and its suffix, before a process starts
        check_batches(path, batches)
    rounds = profile.measure.rounds
    with batch_workers(profile, batches, timeout_s, typed_errors=True) as workers:
        entries = bench_batches(workers, artifacts, rounds)
    return {
        "artifact": str(target),
        "runtime": profile.runtime,
        "threads": profile.threads,
        "rounds": rounds,
        "models": list(artifacts),
        "batches": entries,
    }


def _artifacts(target: Path) -> dict[str, Path]:
    # os.path.isdir: False, not an error, for paths the OS refuses
    return run_dir_models(target) if os.path.isdir(target) else {"model": target}
