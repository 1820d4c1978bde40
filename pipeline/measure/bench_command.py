"""`pipeline bench`'s measurement: in a measuring process with a timeout, so a runtime that
hangs cannot hold the command. Apart from `bench`, which the measuring process itself runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.core.profile import TargetProfile
from pipeline.measure.bench import RUN_DIR_MODELS, bench_run_dir
from pipeline.measure.measure_worker import MeasureWorker
from pipeline.measure.runners.registry import check_runtime


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
