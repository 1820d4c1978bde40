"""Where a candidate's latency comes from: measured on the target (with a cache, and a latency
model that may stand in for measurements that cannot change the outcome), or FLOPs scaled to
the original's latency (AMC's proxy, kept for comparison).

The candidate evaluator holds one `LatencySource`; a new source (a table of per-layer latencies,
a remote farm) is one more class here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from pipeline.core.policy import Policy, policy_layers
from pipeline.core.profile import TargetProfile
from pipeline.measure.latency_model import LatencyModel, should_measure
from pipeline.measure.measure_worker import MeasureWorker
from pipeline.search.measurements import MeasurementCache

CouldWin = Callable[[float], bool]
"""Whether a candidate at this latency (ms) could still become the search's choice."""


@dataclass(frozen=True)
class Built:
    """A candidate as its latency sees it: the measurement key, its graph, its work, and the
    latency model's features (None without a model)."""

    key: str
    path: Path
    macs: int
    features: list[float] | None = None


@dataclass(frozen=True)
class Estimate:
    """A latency in ms, where it came from, and every statistic behind it."""

    ms: float
    source: str  # "measured" | "cached" | "predicted" | "flops"
    stats: dict[str, Any]


class LatencySource(Protocol):
    """Gives each built candidate a latency. `counted` false keeps a measurement that is not a
    candidate (the original in each precision) out of the search's counts."""

    def latency(self, built: Built, could_win: CouldWin, counted: bool = True) -> Estimate: ...


def candidate_features(latency: LatencyModel, model: nn.Module, policy: Policy) -> list[float]:
    """The latency model's features of `model` (pruned) run with `policy`'s precisions."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    channels = {
        n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for n, m in layers.items()
    }
    precisions = {n: policy.action(n).precision.value for n in policy_layers(model)}
    return latency.features(sizes, precisions, channels)


@dataclass
class MeasuredLatency:
    """Measured on the target through the measuring process, each architecture once (`cache`);
    with a `model`, a prediction stands in for a measurement that could not change the
    search's choice, and every real measurement teaches the model."""

    profile: TargetProfile
    worker: MeasureWorker
    cache: MeasurementCache = field(default_factory=MeasurementCache)
    model: LatencyModel | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: {"measured": 0, "cached": 0, "predicted": 0}
    )

    def features(self, model: nn.Module, policy: Policy) -> list[float] | None:
        return None if self.model is None else candidate_features(self.model, model, policy)

    def latency(self, built: Built, could_win: CouldWin, counted: bool = True) -> Estimate:
        statistic = self.profile.measure.statistic
        cached = self.cache.get(built.key)
        if cached is not None:
            self.counts["cached"] += int(counted)
            return Estimate(cached[statistic], "cached", cached)
        x = built.features
        model = self.model if x is not None else None
        predicted = model.predict(x) if model is not None else None
        if counted and model is not None and not should_measure(model, predicted, could_win):
            self.counts["predicted"] += 1
            return Estimate(predicted, "predicted", {"predicted": predicted})
        stats = self.worker.measure(built.path)["latency_ms"]
        self.counts["measured"] += int(counted)
        self.cache.put(built.key, stats)
        if model is not None:
            model.observe(x, stats[statistic], predicted if counted else None)
        return Estimate(stats[statistic], "measured", stats)


@dataclass(frozen=True)
class FlopsLatency:
    """The original's latency times the candidate's share of its multiply-adds: nothing is
    measured, by design (FLOPs know nothing of precisions, so every layer stays FP32)."""

    original_ms: float
    original_macs: int

    def latency(self, built: Built, could_win: CouldWin, counted: bool = True) -> Estimate:
        estimate = self.original_ms * built.macs / max(self.original_macs, 1)
        return Estimate(estimate, "flops", {"flops_estimate": estimate})
