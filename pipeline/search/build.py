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
from typing import Any

import numpy as np
from torch import nn

from pipeline.core.policy import Precision, uniform_policy
from pipeline.core.profile import TargetProfile
from pipeline.core.space import SearchSpace
from pipeline.core.train_spec import TrainSpec
from pipeline.measure.bench import over_rounds
from pipeline.measure.latency_model import LatencyModel
from pipeline.measure.measure_worker import MeasureWorker
from pipeline.model.data import Splits
from pipeline.model.evaluate import accuracy, stack, torch_logits
from pipeline.search.candidate import CandidateEvaluator
from pipeline.search.latency import MeasuredLatency
from pipeline.search.materialize import export_graph, latency_calibration, layer_precisions
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

    With `latency_source="flops"` the search measures no candidate: it sees FLOPs scaled to
    the original's latency, and as FLOPs know nothing of precisions, every layer stays FP32 (a
    derived budget still sees the original measured in every precision).
    With `max_accuracy_drop` (a fraction), the search is for the fastest candidate within it.
    """
    # The evaluator keeps this worker: starting a measuring process takes seconds.
    worker = MeasureWorker(profile, timeout_s)
    try:
        flops = latency_source == "flops"
        session = _originals_session(
            model, splits, profile, original_onnx, worker, opset, flops and not callable(budget_ms)
        )
        fixed_budget = None if callable(budget_ms) else budget_ms
        original_ms = session[Precision.FP32]["latency_ms"][profile.measure.statistic]
        space = _space(model, splits, profile, original_onnx, original_ms, fixed_budget)
        space = dataclasses.replace(space, max_accuracy_drop=max_accuracy_drop)
        if flops:
            space = dataclasses.replace(space, precisions=(Precision.FP32,))
        use_model = latency_model and latency_source == "measured"
        measured = MeasuredLatency(
            profile, worker, cache or MeasurementCache(), LatencyModel(space) if use_model else None
        )
        by_precision = record_uniform_precisions(model, space, measured, session)
        space = dataclasses.replace(
            space,
            precision_latency_ms=by_precision,
            budget_ms=_budget(budget_ms, space, session, by_precision, profile.measure.statistic),
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


def _budget(
    budget_ms: Budget,
    space: SearchSpace,
    session: dict[Precision, dict[str, Any]],
    by_precision: dict[str, float],
    statistic: str,
) -> float | None:
    """The search's budget: the one given, or derived once every precision is measured ("0.6 x
    the fastest" needs them all, those a FLOPs-driven search leaves out included)."""
    if not callable(budget_ms):
        return space.budget_ms
    every = {p.value: float(r["latency_ms"][statistic]) for p, r in session.items()}
    return budget_ms(space.original_latency_ms, {**every, **by_precision})


def _originals_session(
    model: nn.Module,
    splits: Splits,
    profile: TargetProfile,
    original_onnx: Path,
    worker: MeasureWorker,
    opset: int,
    fp32_only: bool,
) -> dict[Precision, dict[str, Any]]:
    """`measure_originals` of the original and, unless `fp32_only`, its uniform graphs."""
    with tempfile.TemporaryDirectory() as tmp:
        graphs: dict[Precision, Path] = {}
        if not fp32_only:
            calib = latency_calibration(splits, profile)
            graphs = uniform_graphs(model, profile, calib, opset, Path(tmp))
        return measure_originals(worker, profile, original_onnx, graphs)


def _space(
    model: nn.Module,
    splits: Splits,
    profile: TargetProfile,
    original_onnx: Path,
    original_ms: float,
    budget_ms: float | None,
) -> SearchSpace:
    from pipeline.search.space import build_space

    val_inputs, val_labels = stack(splits.val)
    return build_space(
        model,
        profile,
        original_onnx,
        budget_ms=budget_ms,
        original_accuracy=accuracy(torch_logits(model, val_inputs), val_labels),
        original_latency_ms=original_ms,
    )


def uniform_graphs(
    model: nn.Module, profile: TargetProfile, calib: np.ndarray, opset: int, folder: Path
) -> dict[Precision, Path]:
    """The original with every layer in each allowed precision but FP32 (the original's own
    graph), exported to `folder`. A precision whose export fails is left out, so searches
    never prune in it (`agents.precisions.search_precision`)."""
    graphs = {}
    for precision in profile.precisions:
        if precision == Precision.FP32:
            continue
        path = folder / f"uniform_{precision.value}.onnx"
        try:
            copied = copy.deepcopy(model)
            policy = uniform_policy(copied, 1.0, precision)
            export_graph(copied, layer_precisions(copied, policy), profile, path, calib, opset)
        except Exception as exc:  # the search goes on without that precision
            log.warning("the original in %s could not be exported: %s", precision.value, exc)
            continue
        graphs[precision] = path
    return graphs


def measure_originals(
    worker: MeasureWorker,
    profile: TargetProfile,
    original_onnx: Path,
    graphs: dict[Precision, Path],
) -> dict[Precision, dict[str, Any]]:
    """The original (FP32) and `graphs` measured in one interleaved session of the profile's
    rounds: the budget and the choice of search precision rest on these figures, and one
    reading taken alone can be off by a slow spell of the machine. A precision that fails to
    measure is left out; the original failing is an error."""
    sides: dict[Precision, Path] = {Precision.FP32: original_onnx, **graphs}
    results: dict[Precision, list[dict[str, Any]]] = {key: [] for key in sides}
    for _ in range(profile.measure.rounds):
        for key in list(results):
            try:
                results[key].append(worker.measure(sides[key]))
            except Exception as exc:
                if key == Precision.FP32:
                    raise
                log.warning("the original in %s could not be measured: %s", key.value, exc)
                del results[key]
    return {key: over_rounds(rounds) for key, rounds in results.items()}


def record_uniform_precisions(
    model: nn.Module,
    space: SearchSpace,
    measured: MeasuredLatency,
    session: dict[Precision, dict[str, Any]],
) -> dict[str, float]:
    """{precision -> the original's latency in it}, from `measure_originals`' session. FP32 is
    the original's own latency; each other becomes the cached measurement of that candidate (a
    resumed search keeps the one it cached first). Each is an anchor of the latency model."""
    statistic = measured.profile.measure.statistic
    by_precision: dict[str, float] = {}
    for precision, result in session.items():
        if precision not in space.precisions:
            continue
        policy = uniform_policy(model, 1.0, precision)
        stats = result["latency_ms"]
        if precision != Precision.FP32:
            key = candidate_key(model, policy, measured.profile)
            cached = measured.cache.get(key)
            if cached is None:
                measured.cache.put(key, stats)
            stats = cached or stats
        by_precision[precision.value] = float(stats[statistic])
        if measured.model is not None:
            features = measured.features(model, policy)
            measured.model.observe(features, by_precision[precision.value], None)
    return by_precision
