"""Typed records of a run: what each stage found, which the report renders.

The stages fill one `RunRecord` in order; `pipeline.run.report` only reads it. Each field says
which stage writes it, so a new stage adds a field here rather than a string key somewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LATENCY_KEYS = ("median", "p90", "cv")


@dataclass(frozen=True)
class Latency:
    """One model's latency on the target over interleaved rounds (`bench_interleaved`)."""

    median: float
    p90: float
    mean: float
    min: float
    cv: float
    rounds_ms: list[float]
    floor_ms: float | None
    floor_ratio: float | None
    noisy: bool

    @classmethod
    def from_bench(cls, bench: Mapping[str, Any]) -> Latency:
        """Read a `bench_interleaved` side (plain data, as a measuring process returns it)."""
        lat = bench["latency_ms"]
        return cls(
            median=float(lat["median"]),
            p90=float(lat["p90"]),
            mean=float(lat.get("mean", lat["median"])),
            min=float(lat.get("min", lat["median"])),
            cv=float(lat["cv"]),
            rounds_ms=[float(r) for r in bench.get("rounds_ms") or [lat["median"]]],
            floor_ms=bench.get("floor_ms"),
            floor_ratio=bench.get("floor_ratio"),
            noisy=bool(bench.get("noisy", False)),
        )

    def stat(self, statistic: str) -> float:
        """The profile's gating statistic (`median` or `p90`)."""
        return float(getattr(self, statistic))

    def summary(self) -> dict[str, float]:
        """The `latency_ms` section of report.json."""
        return {k: getattr(self, k) for k in LATENCY_KEYS}

    def floor(self) -> dict[str, float | None]:
        return {"floor_ms": self.floor_ms, "floor_ratio": self.floor_ratio}


@dataclass
class ModelFigures:
    """One model's figures: accuracy and per-image correctness on test, size, work, latency."""

    accuracy: float | None = None
    correct: np.ndarray | None = None  # (N,) bool over the test images: the paired intervals
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    latency: Latency | None = None


@dataclass(frozen=True)
class PrecisionCheck:
    """The same pruned model in FP32 and in the policy's precisions, measured together."""

    fp32_ms: dict[str, float]
    policy_ms: dict[str, float]
    speedup: float
    not_slower: bool
    shipped: str  # "policy", or "fp32" when a searched policy fell back to FP32

    def as_dict(self) -> dict[str, Any]:
        return {
            "fp32_ms": self.fp32_ms,
            "policy_ms": self.policy_ms,
            "speedup": self.speedup,
            "not_slower": self.not_slower,
            "shipped": self.shipped,
        }


@dataclass
class SearchRecord:
    """What the search stage found; `summary` is report.json's `search` section as it stands."""

    summary: dict[str, Any]
    budget_ms: float | None  # None under the accuracy-floor objective without a budget
    original_ms: float  # the original measured at the search's start (drift check)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # True when the budget is a fraction of the original's latency measured at the start (the
    # default budget), not milliseconds given: the final gate then judges it as that ratio
    budget_relative: bool = False


@dataclass
class RunRecord:
    """Everything the stages of one run found, in the order they write it."""

    original: ModelFigures = field(default_factory=ModelFigures)  # baseline, measure
    search: SearchRecord | None = None  # search (absent for a fixed policy)
    channels: dict[str, list[int]] = field(default_factory=dict)  # compress
    deployed: ModelFigures = field(default_factory=ModelFigures)  # export, measure, validate
    precision: dict[str, Any] | None = None  # export: quantization, mismatches, INT8 recovery
    precision_check: PrecisionCheck | None = None  # export, for non-FP32 policies
    engine: dict[str, Any] | None = None  # engine, on local TensorRT targets
    # measure: at each of the profile's `measure.report_batches`, {batch, original, deployed,
    # speedup} (`pipeline.measure.batches.bench_batches`)
    batches: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] | None = None  # validate
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)  # baselines
    baseline_correct: dict[str, np.ndarray] = field(default_factory=dict)  # baselines
    report: dict[str, Any] | None = None  # report: report.json as written

    def correct(self) -> dict[str, np.ndarray]:
        """Per-image correctness of every model evaluated on test, by name."""
        named = {"original": self.original.correct, "deployed": self.deployed.correct}
        named.update(self.baseline_correct)
        return {k: v for k, v in named.items() if v is not None}
