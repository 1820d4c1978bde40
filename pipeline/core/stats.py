"""95% intervals for the claims a report makes: accuracies, paired accuracy differences, and
latency ratios.

- One accuracy: Wilson's score interval for a binomial proportion (good coverage near 0 and 1,
  where the normal approximation is not).
- A difference between two models on the same test images: only the discordant images (one
  right, the other wrong) carry information. Given their number m, the count the first model
  wins is Binomial(m, p); the exact (Clopper-Pearson) interval for p maps to an interval for the
  difference (m / n)(2p - 1). Identical predictions give m = 0: a zero-width interval at 0.
- A latency ratio from interleaved rounds: each round measures both sides, so the per-round
  ratios are paired; a t interval on their logarithm, turned back into a ratio.

A difference whose interval covers 0 is "within noise"; the report says so instead of a winner.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval (fractions for accuracies, x for ratios)."""

    value: float
    low: float
    high: float

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_list(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of A minus accuracy of B on the same n images, with its exact 95% interval.

    Attributes:
        difference: acc(A) - acc(B), a fraction.
        low, high: its 95% interval.
        n: images compared.
        a_only: images A gets right and B gets wrong; `b_only` the reverse.
    """

    difference: float
    low: float
    high: float
    n: int
    a_only: int
    b_only: int

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ci95": [self.low, self.high], "within_noise": self.within_noise}


def accuracy_interval(correct: int, n: int) -> Interval:
    """Wilson's 95% interval for `correct` successes in `n` trials."""
    from scipy.stats import binomtest

    if n <= 0:
        raise ValueError("an accuracy interval needs at least one image")
    ci = binomtest(int(correct), int(n)).proportion_ci(CONFIDENCE, method="wilson")
    return Interval(correct / n, float(ci.low), float(ci.high))


def chance_level(labels: np.ndarray, num_classes: int) -> float:
    """What guessing scores without looking at the input: the better of a uniform guess
    (1 / classes) and always answering the most frequent class of `labels`."""
    labels = np.asarray(labels)
    majority = np.bincount(labels).max() / len(labels) if len(labels) else 0.0
    return max(1.0 / max(num_classes, 1), float(majority))


def at_chance(correct: int, n: int, chance: float) -> bool:
    """Whether `correct` of `n` cannot be told apart from guessing: the accuracy's Wilson 95%
    interval reaches down to `chance` (or below)."""
    return accuracy_interval(correct, n).low <= chance


def correct_of(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: which images the model's top-1 gets right. logits (N, K), labels (N,)."""
    return np.asarray(logits).argmax(axis=1) == np.asarray(labels)


def paired_difference(a_correct: np.ndarray, b_correct: np.ndarray) -> PairedDifference:
    """acc(A) - acc(B) on the same images, with the exact interval on the discordant pairs.

    Args:
        a_correct, b_correct: (N,) bool, image i right for A / for B; the same images in the
            same order.
    """
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(
            f"paired correctness must be two equal (N,) arrays, got {a.shape} {b.shape}"
        )
    n, a_only, b_only = len(a), int((a & ~b).sum()), int((b & ~a).sum())
    m = a_only + b_only
    diff = (a_only - b_only) / n
    if m == 0:  # the models agree on every image: no evidence of any difference
        return PairedDifference(0.0, 0.0, 0.0, n, 0, 0)
    ci = binomtest(a_only, m).proportion_ci(CONFIDENCE, method="exact")
    scale = m / n
    # With every discordant image on one side the exact bound is the point itself; computed
    # another way it can land a rounding error short of it
    low = min(diff, scale * (2 * float(ci.low) - 1))
    high = max(diff, scale * (2 * float(ci.high) - 1))
    return PairedDifference(diff, low, high, n, a_only, b_only)


def ratio_interval(
    numerator_rounds: list[float], denominator_rounds: list[float]
) -> Interval | None:
    """The ratio of medians, and a 95% interval for the typical (geometric mean) per-round
    ratio: each round measured both sides back to back, so its ratio is paired.

    None when fewer than two rounds were measured (no spread to estimate).
    """
    from scipy.stats import t

    num, den = np.asarray(numerator_rounds, float), np.asarray(denominator_rounds, float)
    if len(num) != len(den) or len(num) < 2 or (num <= 0).any() or (den <= 0).any():
        return None
    logs = np.log(num / den)
    half = t.ppf(0.5 + CONFIDENCE / 2, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs))
    mean = float(logs.mean())
    centre = float(np.median(num) / np.median(den))
    return Interval(centre, math.exp(mean - half), math.exp(mean + half))


def paired_ratio(numerator_rounds: list[float], denominator_rounds: list[float]) -> float:
    """The typical per-round ratio (geometric mean) of two sides measured in one interleaved
    session: unlike the ratio of medians it follows each round's pair, so a machine whose speed
    drifts between rounds moves both sides of a round alike."""
    num, den = np.asarray(numerator_rounds, float), np.asarray(denominator_rounds, float)
    return float(np.exp(np.log(num / den).mean()))


def difference_words(diff: PairedDifference, better: str = "more accurate") -> str:
    """'+1.20 points [0.80, 1.60], more accurate' or '... within noise' for a report line."""
    text = f"{diff.difference * 100:+.2f} points [{diff.low * 100:+.2f}, {diff.high * 100:+.2f}]"
    if diff.within_noise:
        return f"{text}, within noise"
    worse = "less accurate" if better == "more accurate" else f"not {better}"
    return f"{text}, {better if diff.difference > 0 else worse}"


def interval_text(
    interval: Interval | list[float] | None, scale: float = 100.0, spec: str = ".2f"
) -> str:
    """'[a, b]' of an interval (accuracies in points by default); '' when there is none."""
    if interval is None:
        return ""
    low, high = (interval.low, interval.high) if isinstance(interval, Interval) else interval
    return f"[{format(low * scale, spec)}, {format(high * scale, spec)}]"
