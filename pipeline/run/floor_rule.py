"""Whether a model built in full holds the accuracy floor: the rule every floor decision uses.

A model built in full (the floor's pick, each descent step, each step of the uniform baseline's
bisection at the floor) is judged by `judge`: it holds the floor when its validation drop plus
`search.floor_confidence`'s quantile (one-sided, 0.9 by default) of the drop's predictive error
stays within the allowed drop. That error is the paired difference's standard error on
validation combined with the one the test set will add (its size scales it): the final gate
reads the test set's own estimate, and the bisection walks to the edge, where a lucky validation
score would otherwise ship a model that loses the floor on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.run.context import RunContext

Z95 = 1.959964  # the paired interval is a 95% one: its half-width is this many standard errors


def val_correct(ctx: RunContext, onnx_path: Path) -> np.ndarray:
    """(N,) bool: which validation images the ONNX model gets right."""
    from exporters import run_onnx
    from pipeline.core.stats import correct_of
    from pipeline.model.evaluate import stack

    inputs, labels = stack(ctx.splits.val)
    return correct_of(run_onnx(onnx_path, inputs, threads=ctx.profile.threads), labels)


def judge(
    original: np.ndarray, correct: np.ndarray, floor: float, n_test: int, confidence: float
) -> dict[str, Any]:
    """Whether a model built in full holds the floor (a validation accuracy): its drop from the
    original, plus `confidence`'s one-sided quantile of the error predicting the test set's drop
    from it (both samples' standard errors; the test set's scaled from validation's by size),
    stays within the allowed drop, i.e. its accuracy less that margin reaches the floor."""
    from scipy.stats import norm

    from pipeline.core.stats import paired_difference

    diff = paired_difference(original, correct)  # original - model: the accuracy drop
    se = (diff.high - diff.low) / (2 * Z95)
    margin = float(norm.ppf(confidence)) * se * (1 + len(correct) / max(n_test, 1)) ** 0.5
    accuracy = float(correct.mean())
    return {
        "val_accuracy": accuracy,
        "standard_error": se,
        "margin": margin,
        "holds_floor": accuracy - margin >= floor,
    }
