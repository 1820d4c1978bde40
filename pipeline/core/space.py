"""What a search sees: the search space, the evaluator, and candidate results.

Agents (`agents`) produce Policies (plain data) and receive CandidateResults; they never touch a
model. The evaluator behind the `Evaluator` protocol prunes, fine-tunes, exports and measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pipeline.core.policy import Policy, Precision


@dataclass(frozen=True)
class LayerInfo:
    """One Conv2d/Linear layer of the original model, in forward order."""

    name: str  # fully qualified module name, the Policy key
    kind: str  # "conv", "dwconv" (depthwise) or "linear"
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    macs: int  # multiply-accumulates of this layer at batch 1
    params: int
    latency_share: float  # measured share of the original model's latency (0 when unknown)
    prunable: bool  # False for the head and grouped-conv groups: they only get a precision
    group: str  # first layer of its coupling group; a group keeps one channel count


@dataclass(frozen=True)
class SearchSpace:
    """What can be chosen and the reference point it is judged against."""

    layers: tuple[LayerInfo, ...]
    precisions: tuple[Precision, ...]
    min_keep: float
    budget_ms: float | None
    original_accuracy: float  # validation accuracy of the original model
    original_latency_ms: float  # measured with the profile's statistic
    original_macs: int
    removable_blocks: tuple[str, ...] = ()  # residual blocks that can become identity (N2N)
    # The original with every layer in one precision, measured on the target: {"int8": ms, ...}.
    # Whether INT8 (or FP16) is faster at all is a property of the target, not a constant.
    precision_latency_ms: dict[str, float] = field(default_factory=dict)
    # The accuracy-floor objective: the most validation accuracy (a fraction) a candidate may
    # lose against the original. None: the budget objective (most accurate under the budget).
    max_accuracy_drop: float | None = None
    # The most accuracy (a fraction) the final gate lets a deployable model lose, under either
    # objective: the profile's max_accuracy_drop. N2N reads it to judge removals under a budget.
    gate_drop: float | None = None
    # How much validation accuracy the deployed model's full recovery fine-tune is expected to
    # add to a candidate's short-fine-tune score (measured once, `pipeline.search.allowance`).
    # Candidates are judged on the score, so the floor they must hold is lowered by it.
    recovery_allowance: float = 0.0

    @property
    def prunable(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if layer.prunable]

    @property
    def accuracy_floor(self) -> float | None:
        """The least validation score a candidate may have (None without a floor): the shipped
        floor less the recovery the full fine-tune is expected to add."""
        shipped = self.shipped_floor
        return None if shipped is None else shipped - self.recovery_allowance

    @property
    def shipped_floor(self) -> float | None:
        """The least validation accuracy the deployed model may have (None without a floor)."""
        if self.max_accuracy_drop is None:
            return None
        return self.original_accuracy - self.max_accuracy_drop

    @property
    def objective(self) -> str:
        """ "budget" (most accurate under the budget), "floor" (fastest within the accuracy
        floor) or "both" (fastest within the floor that also meets the budget)."""
        if self.max_accuracy_drop is None:
            return "budget"
        return "floor" if self.budget_ms is None else "both"


@dataclass(frozen=True)
class CandidateResult:
    """A candidate's evaluation. On failure `source` is "failed" and `error` says why."""

    policy: Policy
    accuracy: float  # validation accuracy after the short recovery fine-tune; 0.0 on failure
    latency_ms: float | None  # the profile's statistic, measured or from the cache
    macs: int | None = None
    params: int | None = None
    source: str = "measured"  # "measured" | "cached" | "predicted" | "failed"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_ms is not None


class ChannelGate(Protocol):
    """Joint training with per-channel keep/drop masks, for DECORE.

    `groups` maps a coupling group's name to its channel count. `step(masks)` trains the
    network copy for one batch with each group's channels multiplied by its 0/1 mask
    (a float tensor of shape (channels,)) and returns per-sample correctness, shape (batch,).
    """

    groups: dict[str, int]

    def step(self, masks: dict[str, Any]) -> np.ndarray: ...


class Evaluator(Protocol):
    """Evaluates policies on the target. Implemented by
    `pipeline.search.candidate.CandidateEvaluator`.

    An evaluator may also offer `workers` (candidates it evaluates at once; 1 when absent) and
    `evaluate_iter(policies)`, yielding their results in submission order as each completes
    (`pipeline.search.parallel.evaluator.RayEvaluator`); agents reach both through `Agent`.
    What only some agents need is a capability of its own (`ProxyAccuracy`, `ChannelGating`):
    an evaluator offers it or not, and the agent that needs it checks.
    """

    space: SearchSpace

    def evaluate(self, policy: Policy) -> CandidateResult:
        """Prune, briefly fine-tune (distilled from the original), export, measure, validate."""
        ...


@runtime_checkable
class ProxyAccuracy(Protocol):
    """A cheap accuracy signal for dense, per-layer rewards (PuRL)."""

    def proxy_accuracy(self, policy: Policy) -> float:
        """Validation accuracy of the policy pruned without fine-tuning."""
        ...


@runtime_checkable
class ChannelGating(Protocol):
    """Masked training over a copy of the original model (DECORE)."""

    def channel_gate(self, seed: int) -> ChannelGate:
        """A masked-training session, its batches seeded by `seed`."""
        ...


@runtime_checkable
class SideBySide(Protocol):
    """Latencies of a few policies measured again in one interleaved session, where one reading
    each cannot order them (on a shared 2-core CPU one graph read 0.45 and 0.51 ms minutes
    apart)."""

    def measure_side_by_side(self, policies: list[Policy]) -> list[float]:
        """Each policy's latency in ms on the scale of the search's start: its per-round ratio
        to the unpruned model in the fastest precision, measured beside it, times that model's
        latency from the start (`SearchSpace.precision_latency_ms`)."""
        ...


def require(evaluator: object, capability: type, agent: str) -> None:
    """Fail clearly when an agent is given an evaluator without the capability it needs."""
    if not isinstance(evaluator, capability):
        raise TypeError(
            f"the {agent} agent needs an evaluator with {capability.__name__}; "
            f"{type(evaluator).__name__} has none"
        )


RewardFn = Callable[[CandidateResult, SearchSpace, float], float]
"""reward(result, space, progress in [0, 1] through the search) -> finite float."""

EpisodeCallback = Callable[[CandidateResult, float], None]
"""Called by an agent after every evaluated candidate with its reward."""
