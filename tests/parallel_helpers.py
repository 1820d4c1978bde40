"""Helpers for the scale-out tests: a Ray cluster of 2 CPUs and a quick real evaluator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from pipeline.candidate import CandidateEvaluator, MeasurementCache, build_evaluator
from pipeline.data import Splits
from pipeline.finetune import TrainSpec
from pipeline.profile import TargetProfile

TEST_INPUT = (3, 32, 32)
CANDIDATE_SPEC = TrainSpec(steps=5, lr=0.01, batch_size=32, kd_weight=1.0)


def quick_evaluator(
    model: nn.Module, splits: Splits, profile: TargetProfile, folder: Path
) -> CandidateEvaluator:
    """A real CandidateEvaluator as `tiny_evaluator` builds it (budget 0.7 x the original's
    measured latency), for any model: an untrained one spares the session's training."""
    from exporters import export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, TEST_INPUT, folder / "original.onnx")
    evaluator = build_evaluator(
        model,
        splits,
        profile,
        onnx_path,
        CANDIDATE_SPEC,
        budget_ms=None,
        cache=MeasurementCache(folder / "measurements.jsonl"),
    )
    budget = 0.7 * evaluator.space.original_latency_ms
    evaluator.space = dataclasses.replace(evaluator.space, budget_ms=budget)
    return evaluator
