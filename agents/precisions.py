"""Which precisions a search may choose among, and the one searches that only prune run in.

Every agent needs these, with or without the env: the env orders precisions into its actions,
the baselines and the paper agents that choose only channels run every layer in
`search_precision`, and latency estimates scale by `precision_factor`.
"""

from __future__ import annotations

import math

from pipeline.core.policy import Precision
from pipeline.core.space import SearchSpace

# Rough latency multipliers per precision: they only shape the observation's budget estimate
# and the dense reward; the measured latency decides the episode's reward.
PRECISION_FACTOR = {Precision.FP32: 1.0, Precision.FP16: 0.6, Precision.INT8: 0.45}
_PRECISION_ORDER = (Precision.INT8, Precision.FP16, Precision.FP32)  # by bit width


def ordered_precisions(space: SearchSpace) -> list[Precision]:
    """Allowed precisions from fewest to most bits, so neighbouring action values are alike."""
    allowed = [p for p in _PRECISION_ORDER if p in space.precisions]
    return allowed or [Precision.FP32]


def default_precision(space: SearchSpace) -> Precision:
    """FP32 when the target allows it (the plain pruning baseline), else the widest allowed."""
    return ordered_precisions(space)[-1]


MIN_PRECISION_GAIN = 1.05
"""A narrower precision must make the whole original at least this much faster to be the one
pruning searches run in: within measurement noise, the wider precision's accuracy wins."""


def precision_factor(space: SearchSpace, precision: Precision) -> float:
    """Latency of the original with every layer in `precision` over its FP32 latency.

    Measured on the target when the space has it (`precision_latency_ms`); the rough
    PRECISION_FACTOR otherwise (it only shapes observations and dense rewards then).
    """
    measured = space.precision_latency_ms.get(precision.value)
    original = space.original_latency_ms
    if measured is not None and math.isfinite(measured) and measured > 0 and original > 0:
        return float(measured) / float(original)
    return PRECISION_FACTOR.get(precision, 1.0)


def search_precision(space: SearchSpace) -> Precision:
    """The precision that searches choosing only channels run every layer in.

    The allowed precision in which the whole original measured fastest on the target, when it
    beats the widest allowed one by MIN_PRECISION_GAIN; else the widest. Pruning in FP32 and
    quantizing afterwards wastes the budget where INT8 is fast (the budget is met by cutting
    channels that INT8 alone would have paid for), and where INT8 is slower than FP32 (x86
    without VNNI, S8S8 QOperator) quantizing would only lose accuracy.
    """
    widest = default_precision(space)
    measured = {
        p: space.precision_latency_ms.get(p.value, math.nan) for p in ordered_precisions(space)
    }
    known = {p: v for p, v in measured.items() if math.isfinite(v) and v > 0}
    if not known:
        return widest
    fastest = min(known, key=lambda p: known[p])
    reference = known.get(widest, space.original_latency_ms)
    return fastest if reference >= MIN_PRECISION_GAIN * known[fastest] else widest
