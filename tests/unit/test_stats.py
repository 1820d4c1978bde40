"""The interval math behind every accuracy and ratio a report states."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.stats import (
    PairedDifference,
    accuracy_interval,
    difference_words,
    paired_difference,
    ratio_interval,
)


def test_wilson_interval_of_a_known_binomial_case() -> None:
    # 95 of 100: Wilson's score interval is [0.8882, 0.9785] (Newcombe 1998, table I method 3)
    ci = accuracy_interval(95, 100)
    assert ci.value == 0.95
    assert ci.low == pytest.approx(0.8882, abs=1e-4)
    assert ci.high == pytest.approx(0.9785, abs=1e-4)


def test_wilson_interval_stays_inside_0_1_at_the_edges() -> None:
    perfect, none = accuracy_interval(50, 50), accuracy_interval(0, 50)
    assert perfect.high == pytest.approx(1.0) and 0.9 < perfect.low < 1.0
    assert none.low == pytest.approx(0.0, abs=1e-12) and 0.0 < none.high < 0.1


def test_ten_thousand_images_give_an_interval_within_0_6_points() -> None:
    ci = accuracy_interval(9300, 10000)
    assert (ci.high - ci.low) / 2 < 0.006


def test_identical_predictions_give_a_zero_width_difference() -> None:
    correct = np.random.default_rng(0).random(500) < 0.9
    diff = paired_difference(correct, correct)
    assert (diff.difference, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert diff.within_noise


def test_the_paired_interval_uses_only_the_discordant_images() -> None:
    a = np.ones(1000, bool)
    b = a.copy()
    b[:20] = False  # A right, B wrong on 20 images
    a[20:25] = False  # B right, A wrong on 5
    diff = paired_difference(a, b)
    assert (diff.a_only, diff.b_only, diff.n) == (20, 5, 1000)
    assert diff.difference == pytest.approx(0.015)
    # Clopper-Pearson for 20 of 25 is [0.5930, 0.9317]; the difference is (25/1000)(2p - 1)
    assert diff.low == pytest.approx(0.025 * (2 * 0.59300 - 1), abs=2e-5)
    assert diff.high == pytest.approx(0.025 * (2 * 0.93167 - 1), abs=2e-5)
    assert not diff.within_noise


def test_a_balanced_disagreement_is_within_noise() -> None:
    a = np.ones(400, bool)
    b = a.copy()
    a[:6], b[6:12] = False, False
    diff = paired_difference(a, b)
    assert diff.difference == 0.0 and diff.low < 0 < diff.high and diff.within_noise


@pytest.mark.parametrize(("n", "lost"), [(359, 5), (359, 2), (10000, 7), (1000, 3)])
def test_every_discordant_image_on_one_side_keeps_the_point_inside_its_interval(n, lost) -> None:
    a = np.ones(n, bool)
    b = a.copy()
    b[:lost] = False  # A right and B wrong on every discordant image: the upper bound is exact
    diff = paired_difference(a, b)
    assert diff.low <= diff.difference <= diff.high
    assert diff.high == pytest.approx(lost / n)
    flipped = paired_difference(b, a)
    assert flipped.low <= flipped.difference <= flipped.high


def test_mismatched_correctness_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="equal"):
        paired_difference(np.ones(3, bool), np.ones(4, bool))


def test_the_wording_calls_a_difference_covering_zero_within_noise() -> None:
    tie = PairedDifference(0.002, -0.001, 0.005, 10000, 30, 10)
    win = PairedDifference(0.012, 0.004, 0.02, 10000, 150, 30)
    loss = PairedDifference(-0.012, -0.02, -0.004, 10000, 30, 150)
    assert difference_words(tie) == "+0.20 points [-0.10, +0.50], within noise"
    assert difference_words(win).endswith(", more accurate")
    assert difference_words(loss).endswith(", less accurate")


def test_ratio_interval_from_paired_rounds() -> None:
    ci = ratio_interval([2.0, 2.1, 1.9, 2.0, 2.05], [1.0, 1.05, 0.95, 1.0, 1.0])
    assert ci is not None
    assert ci.value == pytest.approx(2.0)
    assert ci.low < 2.0 < ci.high < 2.2
    # identical per-round ratios: no spread, a zero-width interval
    exact = ratio_interval([3.0, 6.0, 9.0], [1.0, 2.0, 3.0])
    assert exact is not None and exact.low == pytest.approx(3.0) == exact.high
    assert ratio_interval([1.0], [2.0]) is None  # one round: nothing to estimate spread from


def test_paired_ratio_follows_each_rounds_pair_through_a_drift() -> None:
    from pipeline.core.stats import paired_ratio

    # the machine slows 2x after the second round; each round's pair still reads 0.9
    assert paired_ratio([0.9, 0.9, 1.8, 1.8, 1.8], [1.0, 1.0, 2.0, 2.0, 2.0]) == pytest.approx(0.9)
    # rounds that disagree: their geometric mean
    assert paired_ratio([0.5, 2.0], [1.0, 1.0]) == pytest.approx(1.0)
