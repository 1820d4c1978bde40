"""A latency model fitted from the target's own measurements, to spare real measurements.

A candidate's latency is predicted from per-layer terms in the style of HALP's latency tables:
every Conv/Linear layer of the original carries its measured share of the original's latency
(`LayerInfo.latency_share`), and a pruned layer's cost splits into a part that scales with the
work left in it (kept weights over original weights) and a fixed part paid while the layer
exists at all (kernel launch, memory passes); both depend on the layer's precision. Summed per
precision, that gives a handful of features, and the coefficients are fitted by non-negative
ridge regression on relative error, pulled toward a prior that knows the whole original in each
precision (`SearchSpace.precision_latency_ms`). A handful of real measurements fit it.

One more term carries what per-layer sums cannot: where two layers next to each other (in forward
order) run in different precisions, the activation between them is quantized, dequantized or cast
on its way, a memory pass the size of that activation. At 224x224 a random per-layer precision mix
of ResNet-50 ran slower than the same network all INT8 by half, mostly for this.

The model only ever replaces a measurement when its recent error against real measurements is
small; the evaluator decides which candidates must still be measured (`should_measure`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
from scipy.optimize import nnls

from pipeline.core.space import LayerInfo, SearchSpace

# Real measurements before the model predicts anything: the original in each precision and a
# couple of candidates are enough for a prior that already knows each precision's speed.
MIN_FIT = 4
MIN_CHECKED = 3  # predictions checked against measurements before any is trusted
# Every AUDIT_EVERY-th candidate the model would stand in for is measured anyway: the error
# keeps being checked while the model is trusted, so a model that drifts is caught.
AUDIT_EVERY = 8
WINDOW = 10  # recent prediction errors that decide whether the model is trusted
MAX_ERROR = 0.10  # median relative error above which every candidate is measured again
MIN_MARGIN = 0.05  # a prediction is "far" from the budget only beyond this relative margin
RIDGE = 0.05  # pull toward the prior: little data must not give wild coefficients


@dataclass
class LatencyModel:
    """Predicts latency (ms) from a pruned candidate's layer sizes and precisions."""

    space: SearchSpace
    xs: list[list[float]] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # |predicted - measured| / measured
    skipped: int = 0  # candidates predicted since the last audit
    _coef: np.ndarray | None = None

    @property
    def precisions(self) -> list[str]:
        return [p.value for p in self.space.precisions]

    def _shares(self) -> dict[str, float]:
        """Each layer's share of the original's latency; by MACs when it was not measured."""
        shares = {layer.name: layer.latency_share for layer in self.space.layers}
        if sum(shares.values()) > 0:
            return shares
        total = sum(layer.macs for layer in self.space.layers) or 1
        return {layer.name: layer.macs / total for layer in self.space.layers}

    def features(
        self,
        sizes: Mapping[str, int],
        precisions: Mapping[str, str],
        channels: Mapping[str, int] | None = None,
    ) -> list[float]:
        """[1, work per precision..., presence per precision..., precision boundaries], the
        first two in shares of the original's latency, the last in shares of its activations.

        Args:
            sizes: Weight elements of each Conv/Linear layer of the candidate (a removed
                layer is absent).
            precisions: Each present layer's precision ("int8", "fp16", "fp32").
            channels: Each present layer's output channels (the original's where absent).
        """
        original = {layer.name: layer.params for layer in self.space.layers}
        work = dict.fromkeys(self.precisions, 0.0)
        presence = dict.fromkeys(self.precisions, 0.0)
        for name, share in self._shares().items():
            if name not in sizes or name not in precisions:
                continue  # removed with its block
            kept = sizes[name] / max(original[name], 1)
            work[precisions[name]] += share * min(kept, 1.0)
            presence[precisions[name]] += share
        boundaries = self._boundaries(sizes, precisions, channels or {})
        return [1.0, *work.values(), *presence.values(), boundaries]

    def _boundaries(
        self, sizes: Mapping[str, int], precisions: Mapping[str, str], channels: Mapping[str, int]
    ) -> float:
        """Activation elements that cross from one precision to another between layers next to
        each other in forward order, over all the original's layer outputs."""
        present = [x for x in self.space.layers if x.name in sizes and x.name in precisions]
        crossing = sum(
            _output_elements(a, channels.get(a.name))
            for a, b in pairwise(present)
            if precisions[a.name] != precisions[b.name]
        )
        total = sum(_output_elements(layer) for layer in self.space.layers)
        return crossing / max(total, 1.0)

    def _prior(self) -> np.ndarray:
        """Latency in units of the original's: the non-layer remainder, then each precision's
        speed relative to FP32 on the work, and no fixed part."""
        measured = self.space.precision_latency_ms
        fp32 = measured.get("fp32") or self.space.original_latency_ms
        remainder = max(1.0 - sum(self._shares().values()), 0.0)
        speed = [measured.get(p, fp32) / fp32 for p in self.precisions]
        return np.array([remainder, *speed, *([0.0] * len(speed)), 0.0])

    def observe(self, x: list[float], measured_ms: float, predicted_ms: float | None) -> None:
        """Add a real measurement (and the error of the prediction made for it, if any)."""
        if predicted_ms is not None:
            self.errors.append(abs(predicted_ms - measured_ms) / measured_ms)
        self.xs.append(list(x))
        self.ys.append(float(measured_ms))
        self._coef = None

    def _fit(self) -> np.ndarray:
        """Ridge regression on relative error toward the prior (in units of the original)."""
        if self._coef is None:
            scale = self.space.original_latency_ms
            x = np.asarray(self.xs)
            y = np.asarray(self.ys) / scale
            weight = 1.0 / y  # relative error: a fast candidate counts as much as a slow one
            prior = self._prior()
            # Costs are never negative: non-negative least squares on the ridge-augmented
            # system, so that extrapolating to a much smaller candidate cannot predict < 0.
            root = np.sqrt(RIDGE) * np.eye(len(prior))
            a = np.vstack([x * weight[:, None], root])
            b = np.concatenate([y * weight, root @ prior])
            self._coef = nnls(a, b)[0]
        return self._coef

    @property
    def ready(self) -> bool:
        return len(self.ys) >= MIN_FIT

    @property
    def recent_error(self) -> float | None:
        """Median relative error of the last predictions checked against measurements."""
        if not self.errors:
            return None
        return float(np.median(self.errors[-WINDOW:]))

    @property
    def trusted(self) -> bool:
        """Fitted on enough measurements and recently right; otherwise everything is measured."""
        error = self.recent_error
        enough = len(self.errors) >= MIN_CHECKED
        return self.ready and enough and error is not None and error <= MAX_ERROR

    def predict(self, x: list[float]) -> float | None:
        """Predicted latency in ms; None before enough measurements."""
        if not self.ready:
            return None
        value = float(np.asarray(x) @ self._fit()) * self.space.original_latency_ms
        return max(value, 1e-6)

    def margin(self) -> float:
        """How far (relative) a prediction must be from a boundary to be believed."""
        return max(2.0 * (self.recent_error or MAX_ERROR), MIN_MARGIN)

    def audit(self) -> bool:
        """Called for each candidate the model could stand in for: True when this one is
        to be measured anyway, to check the model."""
        self.skipped += 1
        if self.skipped < AUDIT_EVERY:
            return False
        self.skipped = 0
        return True

    def state(self) -> dict[str, Any]:
        return {"xs": self.xs, "ys": self.ys, "errors": self.errors, "skipped": self.skipped}

    def restore(self, state: Mapping[str, Any]) -> None:
        width = len(self._prior())  # rows of another feature layout are dropped, not misread
        rows = [
            (list(x), float(y))
            for x, y in zip(state.get("xs", []), state.get("ys", []), strict=True)
        ]
        self.xs = [x for x, _ in rows if len(x) == width]
        self.ys = [y for x, y in rows if len(x) == width]
        self.errors = [float(e) for e in state.get("errors", [])]
        self.skipped = int(state.get("skipped", 0))
        self._coef = None

    def summary(self) -> dict[str, Any]:
        """For report.json: how well the model predicted real measurements."""
        errors = np.asarray(self.errors)
        return {
            "fitted_on": len(self.ys),
            "checked": len(self.errors),
            "median_abs_error": float(np.median(errors)) if len(errors) else None,
            "p90_abs_error": float(np.percentile(errors, 90)) if len(errors) else None,
        }


def _output_elements(layer: LayerInfo, channels: int | None = None) -> float:
    """Output activation elements of a Conv/Linear layer at batch 1: channels times the output
    positions, which are its MACs over its weights."""
    positions = layer.macs / max(layer.params, 1)
    return (layer.out_channels if channels is None else channels) * positions


def should_measure(
    model: LatencyModel, predicted: float | None, could_win: Callable[[float], bool]
) -> bool:
    """Whether a candidate must be measured for real rather than trusted to the model.

    Only a candidate that could become the search's result needs its true latency: one not
    clearly over the budget for which `could_win(optimistic latency)` holds (its accuracy and
    its latency at the favourable end of the model's margin would make it the best so far).
    Everything is measured while the model is untrusted or there is no budget, and one in
    `AUDIT_EVERY` of the others is measured to keep checking the model. A prediction that is
    wrong can then only misstate the reward of a candidate that is not going to be shipped.
    """
    budget = model.space.budget_ms
    if predicted is None or budget is None or not model.trusted:
        return True
    optimistic = predicted * (1 - model.margin())
    # Clearly over the budget, it cannot be shipped (its reward is the penalty).
    if optimistic <= budget and could_win(optimistic):
        return True
    return model.audit()
