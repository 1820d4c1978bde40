"""What one run's stages share: its inputs and services (`RunContext`), and the console they
report progress on. What the stages find goes into the `RunRecord` (`pipeline.core.records`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from torch import nn

from pipeline.core.config import RunConfig
from pipeline.core.policy import Policy
from pipeline.core.profile import TargetProfile
from pipeline.measure.measure_worker import MeasureWorker
from pipeline.model.data import Splits

console = Console()


@dataclass(frozen=True)
class TestSet:
    """The test split stacked once: every model of the run is evaluated on these images, and
    the original's logits on them are the reference of the deployed model's validation."""

    inputs: np.ndarray
    labels: np.ndarray
    original_logits: np.ndarray


@dataclass
class RunContext:
    """The inputs of one run (loaded by the first stage) and the services its stages use.

    `model` is the work in progress: the pruned, recovered model that becomes model.onnx.
    """

    profile: TargetProfile
    config: RunConfig
    run_dir: Path
    resume: bool = False
    splits: Splits | None = None
    original: nn.Module | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    policy: Policy | None = None
    test: TestSet | None = None
    model: nn.Module | None = None
    started: float = field(default_factory=time.time)
    measurer: MeasureWorker | None = None
    # Why the TensorRT runtime cannot run here, when the run still exports (`stages.load_inputs`)
    runtime_missing: str | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.profile.input.shape)  # type: ignore[return-value]

    def bench(
        self, artifacts: dict[str, Path], rounds: int | None = None
    ) -> dict[str, dict[str, Any]]:
        """Measure artifacts side by side for the final comparisons and gates.

        Like the search's candidates, they are measured in a separate measuring process:
        this one holds torch's thread pools and progress threads, which would slow the
        runtime and make the gate disagree with the search. Sides are interleaved over the
        profile's `measure.rounds` unless `rounds` is given (`bench_interleaved`).
        """
        from pipeline.measure.bench import bench_interleaved

        if self.measurer is None:
            self.measurer = MeasureWorker(self.profile, self.config.search.timeout_s)
        rounds = rounds or self.profile.measure.rounds
        return bench_interleaved(self.measurer.measure, artifacts, rounds)

    def bench_batches(self, artifacts: dict[str, Path]) -> list[dict[str, Any]]:
        """Measure artifacts side by side at each of the profile's `measure.report_batches`,
        interleaved over batches and models (`pipeline.measure.batches.bench_batches`)."""
        from pipeline.measure.batches import batch_workers, bench_batches

        batches = self.profile.measure.report_batches
        with batch_workers(self.profile, batches, self.config.search.timeout_s) as workers:
            return bench_batches(workers, artifacts, self.profile.measure.rounds)

    def close(self) -> None:
        if self.measurer is not None:
            self.measurer.close()
            self.measurer = None


def stage(message: str) -> None:
    console.print(f"[bold cyan]>[/] {message}")
