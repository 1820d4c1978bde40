"""`build_evaluator`: measure the original, build the search space around it (budget and the
original's latency in each precision included), and hand back a ready candidate evaluator.

The space is complete before the evaluator exists, so nothing replaces it afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from pipeline.core.policy import Precision, uniform_policy
from pipeline.core.profile import TargetProfile
from pipeline.core.space import SearchSpace
from pipeline.core.train_spec import TrainSpec
from pipeline.measure.latency_model import LatencyModel
from pipeline.measure.measure_worker import MeasureWorker
from pipeline.model.data import Splits
from pipeline.model.evaluate import accuracy, stack, torch_logits
from pipeline.search.candidate import CANDIDATE_CALIB_SAMPLES, CandidateEvaluator
from pipeline.search.latency import Built, MeasuredLatency
from pipeline.search.materialize import export_graph, layer_precisions
from pipeline.search.measurements import MeasurementCache, candidate_key

log = logging.getLogger(__name__)

Budget = float | Callable[[float, dict[str, float]], float | None] | None
"""A budget in ms, or how to derive one (None: no budget) from the original's measured latency
and its latency with every layer in each allowed precision (e.g. {"fp32": 2.1, "int8": 0.6})."""


def build_evaluator(
    model: nn.Module,
    splits: Splits,
    profile: TargetProfile,
    original_onnx: Path,
    finetune: TrainSpec,
    budget_ms: Budget,
    cache: MeasurementCache | None = None,
    timeout_s: float = 120.0,
    latency_model: bool = True,
    latency_source: str = "measured",
    opset: int = 17,
    max_accuracy_drop: float | None = None,
) -> CandidateEvaluator:
    """Measure the original (latency on the target, validation accuracy), build the search
    space around it, and return an evaluator ready for agents. `original_onnx` must exist.

    With `latency_source="flops"` the search measures nothing more: it sees FLOPs scaled to
    the original's latency, and as FLOPs know nothing of precisions, every layer stays FP32.
    With `max_accuracy_drop` (a fraction), the search is for the fastest candidate within it.
    """
    # The evaluator keeps this worker: starting a measuring process takes seconds.
    worker = MeasureWorker(profile, timeout_s)
    try:
        fixed_budget = None if callable(budget_ms) else budget_ms
        space = _space(model, splits, profile, original_onnx, worker, fixed_budget)
        space = dataclasses.replace(space, max_accuracy_drop=max_accuracy_drop)
        if latency_source == "flops":
            space = dataclasses.replace(space, precisions=(Precision.FP32,))
        use_model = latency_model and latency_source == "measured"
        measured = MeasuredLatency(
            profile, worker, cache or MeasurementCache(), LatencyModel(space) if use_model else None
        )
        if latency_source == "flops":
            by_precision = {Precision.FP32.value: space.original_latency_ms}
        else:
            calib = stack(splits.calib)[0][:CANDIDATE_CALIB_SAMPLES]
            by_precision = measure_uniform_precisions(model, space, measured, calib, opset)
        # A derived budget waits for every precision: "0.6 x the fastest" needs them all.
        budget = budget_ms(space.original_latency_ms, by_precision) if callable(budget_ms) else None
        space = dataclasses.replace(
            space,
            precision_latency_ms=by_precision,
            budget_ms=space.budget_ms if budget is None else budget,
        )
        if measured.model is not None:  # its prior knows each precision's speed from here on
            measured.model.space = space
        return CandidateEvaluator(
            model,
            splits,
            profile,
            space,
            finetune,
            opset=opset,
            latency_source=latency_source,
            measured=measured,
        )
    except BaseException:
        worker.close(kill=True)
        raise


def _space(
    model: nn.Module,
    splits: Splits,
    profile: TargetProfile,
    original_onnx: Path,
    worker: MeasureWorker,
    budget_ms: float | None,
) -> SearchSpace:
    from pipeline.search.space import build_space

    latency = worker.measure(original_onnx)["latency_ms"][profile.measure.statistic]
    val_inputs, val_labels = stack(splits.val)
    return build_space(
        model,
        profile,
        original_onnx,
        budget_ms=budget_ms,
        original_accuracy=accuracy(torch_logits(model, val_inputs), val_labels),
        original_latency_ms=latency,
    )


def measure_uniform_precisions(
    model: nn.Module,
    space: SearchSpace,
    measured: MeasuredLatency,
    calib: np.ndarray,
    opset: int = 17,
) -> dict[str, float]:
    """The original with every layer in each allowed precision, measured on the target; these
    are also the latency model's first anchors.

    FP32 is the original's own latency. A precision whose export or measurement fails is
    left out, so searches never prune in it (`agents.precisions.search_precision`).
    """
    profile = measured.profile
    by_precision: dict[str, float] = {}
    if Precision.FP32 in profile.precisions:
        by_precision[Precision.FP32.value] = space.original_latency_ms
        if measured.model is not None:
            fp32 = measured.features(model, uniform_policy(model, 1.0, Precision.FP32))
            measured.model.observe(fp32, space.original_latency_ms, None)
    for precision in profile.precisions:
        if precision == Precision.FP32:
            continue
        policy = uniform_policy(model, 1.0, precision)
        key = candidate_key(model, policy, profile)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "uniform.onnx"
                if measured.cache.get(key) is None:
                    copied = copy.deepcopy(model)
                    precisions = layer_precisions(copied, policy)
                    export_graph(copied, precisions, profile, path, calib, opset)
                built = Built(key, path, 0, measured.features(model, policy))
                estimate = measured.latency(built, lambda ms: True, counted=False)
                by_precision[precision.value] = estimate.ms
        except Exception as exc:  # the search goes on without that precision
            log.warning("the original in %s could not be measured: %s", precision.value, exc)
    return by_precision
