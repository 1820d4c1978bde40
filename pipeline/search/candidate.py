"""evaluate_candidate: Policy -> prune -> short fine-tune -> export -> measure -> accuracy.

`CandidateEvaluator` holds what every candidate needs (the original model, the data, the
profile) and turns each Policy into a CandidateResult. Failures become results with an error,
never exceptions, so the search goes on. Latencies are cached by what determines them: the
pruned architecture, the precision of each layer, the profile and the runtime versions.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from pipeline.core.choice import tied
from pipeline.core.policy import Policy, Precision, policy_layers, uniform_policy
from pipeline.core.profile import TargetProfile
from pipeline.core.space import CandidateResult, SearchSpace
from pipeline.core.train_spec import TrainSpec
from pipeline.measure.latency_model import LatencyModel, should_measure
from pipeline.measure.measure_worker import MeasureWorker
from pipeline.model.data import Splits
from pipeline.model.evaluate import accuracy, stack, torch_logits
from pipeline.model.prune import PruneResult, count_macs_params
from pipeline.search.materialize import (
    Recovery,
    export_graph,
    layer_precisions,
    materialize,
    recover,
)
from pipeline.search.measurements import MeasurementCache, candidate_key

if TYPE_CHECKING:
    from pipeline.search.channel_gate import ChannelGate

log = logging.getLogger(__name__)
CANDIDATE_CALIB_SAMPLES = 64


class CandidateEvaluator:
    """Evaluates policies for the search (the `pipeline.core.space.Evaluator` protocol)."""

    def __init__(
        self,
        model: nn.Module,
        splits: Splits,
        profile: TargetProfile,
        space: SearchSpace,
        finetune: TrainSpec,
        cache: MeasurementCache | None = None,
        timeout_s: float = 120.0,
        opset: int = 17,
        latency_model: bool = True,
        latency_source: str = "measured",
        worker: MeasureWorker | None = None,
    ) -> None:
        self.model = model.eval()
        # "flops": the search sees FLOPs scaled to milliseconds and measures nothing (AMC's
        # proxy, kept for comparison benchmarks).
        self.latency_source = latency_source
        latency_model = latency_model and latency_source == "measured"
        self.splits = splits
        self.profile = profile
        # Fitted from this search's real measurements; predicts the candidates that cannot
        # matter so that they are not measured (pipeline.measure.latency_model).
        self.latency_model = LatencyModel(space) if latency_model else None
        self.space = space
        self.finetune = finetune
        self.recovery = Recovery(finetune, splits.train, self.model, "candidate")
        self.cache = cache or MeasurementCache()
        self.worker = worker or MeasureWorker(profile, timeout_s)
        self.opset = opset
        self.val_inputs, self.val_labels = stack(splits.val)
        # Candidates calibrate INT8 on a subset: enough to rank them, and several times faster
        # than the full calibration the deployed model gets.
        self.calib_inputs = stack(splits.calib)[0][:CANDIDATE_CALIB_SAMPLES]
        self.real_measurements = 0
        self.cached_measurements = 0
        self.predicted_measurements = 0
        # (accuracy, latency) of the measured candidates within the budget: what a new one
        # must beat to become the result (see `_could_win`).
        self._within: list[tuple[float, float]] = []
        self._accuracy_memo: dict[str, tuple[float, int, int]] = {}
        self._original_macs: int | None = None

    @property
    def space(self) -> SearchSpace:
        return self._space

    @space.setter
    def space(self, space: SearchSpace) -> None:
        """The budget and the precision latencies arrive after construction."""
        self._space = space
        if self.latency_model is not None:
            self.latency_model.space = space

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.profile.input.shape)  # type: ignore[return-value]

    def state(self) -> dict[str, Any]:
        """Counters and latency model, for the search's checkpoints."""
        return {
            "real_measurements": self.real_measurements,
            "cached_measurements": self.cached_measurements,
            "predicted_measurements": self.predicted_measurements,
            "within_budget": self._within,
            "latency_model": self.latency_model.state() if self.latency_model else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.real_measurements = state["real_measurements"]
        self.cached_measurements = state["cached_measurements"]
        self.predicted_measurements = state.get("predicted_measurements", 0)
        self._within = [tuple(pair) for pair in state.get("within_budget", [])]
        if self.latency_model is not None and state.get("latency_model"):
            self.latency_model.restore(state["latency_model"])

    def evaluate(self, policy: Policy) -> CandidateResult:
        """Prune, fine-tune briefly (distilled), export, measure on the target, score on val."""
        try:
            return self._evaluate(policy)
        except Exception as exc:  # failures are data: the search goes on
            first = str(exc).splitlines()[0] if str(exc) else ""
            log.debug("candidate failed", exc_info=True)
            return CandidateResult(
                policy, 0.0, None, source="failed", error=f"{type(exc).__name__}: {first}"
            )

    def _evaluate(self, policy: Policy) -> CandidateResult:
        pruning = self._pruned_copy(policy)
        pruned = pruning.model
        key = candidate_key(pruned, policy, self.profile)
        x = self._features(pruned, policy)
        # Keep ratios that round to the same channel counts give the same pruned model and, with
        # the seeded fine-tune, the same accuracy: such repeats are not trained again.
        policy_id = _model_id(key, policy)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "candidate.onnx"
            if policy_id in self._accuracy_memo:
                acc, macs, params = self._accuracy_memo[policy_id]
                if self.cache.get(key) is None:
                    self._export(pruned, policy, onnx_path)
            else:
                # An unpruned candidate (one that only changes precisions) is scored as trained:
                # a short fine-tune at the recovery rate cost ResNet-34 30 points of accuracy
                if not pruning.unchanged:
                    recover(
                        pruned, Recovery(self.finetune, self.splits.train, self.model, "candidate")
                    )
                self._export(pruned, policy, onnx_path)
                acc = self._onnx_accuracy(onnx_path)
                macs, params = count_macs_params(pruned, self.input_shape)
                self._accuracy_memo[policy_id] = (acc, macs, params)
            if self.latency_source == "flops":
                latency, source, stats = self._flops_latency(macs)
            else:
                latency, source, stats = self._latency(key, onnx_path, x=x, accuracy=acc)
        if not np.isfinite(acc):
            raise ValueError("validation accuracy is not finite")
        self._track_best(acc, latency, source)
        return CandidateResult(policy, acc, latency, macs, params, source, extra={"stats": stats})

    def _pruned_copy(self, policy: Policy) -> PruneResult:
        return materialize(self.model, policy, self.profile, min_keep=self.space.min_keep)

    def export_untrained(self, policy: Policy, path: Path) -> None:
        """The candidate's graph without its fine-tune: the same latency, for re-measuring it."""
        self._export(self._pruned_copy(policy).model, policy, path)

    def _export(self, pruned: nn.Module, policy: Policy, path: Path) -> None:
        precisions = layer_precisions(pruned, policy)
        export_graph(pruned, precisions, self.profile, path, self.calib_inputs, self.opset)

    def _onnx_accuracy(self, path: Path) -> float:
        from exporters import run_onnx

        logits = run_onnx(path, self.val_inputs, threads=self.profile.threads)
        if not np.isfinite(logits).all():
            raise ValueError("the candidate outputs NaN or inf")
        return accuracy(logits, self.val_labels)

    def _features(self, pruned: nn.Module, policy: Policy) -> list[float] | None:
        if self.latency_model is None:
            return None
        sizes = {
            n: m.weight.numel()
            for n, m in pruned.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        }
        precisions = {n: policy.action(n).precision.value for n in policy_layers(pruned)}
        return self.latency_model.features(sizes, precisions)

    def _latency(
        self,
        key: str,
        path: Path,
        count: bool = True,
        x: list[float] | None = None,
        accuracy: float = 0.0,
    ) -> tuple[float, str, dict[str, Any]]:
        """The statistic, its source and every statistic; `count` False keeps measurements
        that are not candidates (the original in each precision) out of the search's counts.
        With features `x`, the latency model may stand in for a measurement that cannot
        change the search's outcome, and learns from every real one."""
        statistic = self.profile.measure.statistic
        cached = self.cache.get(key)
        if cached is not None:
            self.cached_measurements += int(count)
            return cached[statistic], "cached", cached
        model = self.latency_model if x is not None else None
        predicted = model.predict(x) if model is not None else None
        if (
            count
            and model is not None
            and not should_measure(model, predicted, lambda ms: self._could_win(accuracy, ms))
        ):
            self.predicted_measurements += 1
            return predicted, "predicted", {"predicted": predicted}
        stats = self.worker.measure(path)["latency_ms"]
        self.real_measurements += int(count)
        self.cache.put(key, stats)
        if model is not None:
            model.observe(x, stats[statistic], predicted if count else None)
        return stats[statistic], "measured", stats

    def _flops_latency(self, macs: int) -> tuple[float, str, dict[str, Any]]:
        """The original's latency times the candidate's share of its multiply-adds."""
        if self._original_macs is None:
            self._original_macs = count_macs_params(self.model, self.input_shape)[0]
        estimate = self.space.original_latency_ms * macs / max(self._original_macs, 1)
        return estimate, "flops", {"flops_estimate": estimate}

    def _could_win(self, acc: float, latency_ms: float) -> bool:
        """Whether a candidate with this accuracy and latency would be the search's choice
        among the measured ones (`pipeline.core.choice.choose_best`: the most accurate, and among
        accuracies closer than one validation sample, the fastest)."""
        resolution = 1.0 / max(len(self.val_labels), 1)
        top = max([a for a, _ in self._within] + [acc])
        if not tied(acc, top, resolution):
            return False
        rivals = [ms for a, ms in self._within if tied(a, top, resolution)]
        return not rivals or latency_ms < min(rivals)

    def _track_best(self, acc: float, latency: float, source: str) -> None:
        budget = self.space.budget_ms
        if source != "predicted" and (budget is None or latency <= budget):
            self._within.append((acc, latency))

    def measure_uniform_precisions(self) -> dict[str, float]:
        """The original with every layer in each allowed precision, measured on the target.

        FP32 is the original's own latency. A precision whose export or measurement fails is
        left out, so searches never prune in it (`agents.env.search_precision`).
        """
        measured: dict[str, float] = {}
        if Precision.FP32 in self.profile.precisions:
            measured[Precision.FP32.value] = self.space.original_latency_ms
            if self.latency_model is not None:
                fp32 = self._features(self.model, uniform_policy(self.model, 1.0, Precision.FP32))
                self.latency_model.observe(fp32, self.space.original_latency_ms, None)
        for precision in self.profile.precisions:
            if precision == Precision.FP32:
                continue
            policy = uniform_policy(self.model, 1.0, precision)
            key = candidate_key(self.model, policy, self.profile)
            x = self._features(self.model, policy)  # anchors of the latency model
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "uniform.onnx"
                    if self.cache.get(key) is None:
                        self._export(copy.deepcopy(self.model), policy, path)
                    measured[precision.value] = self._latency(key, path, False, x)[0]
            except Exception as exc:  # the search goes on without that precision
                log.warning("the original in %s could not be measured: %s", precision.value, exc)
        return measured

    def proxy_accuracy(self, policy: Policy) -> float:
        """Validation accuracy of the policy pruned without fine-tuning (PuRL's dense signal)."""
        try:
            pruned = self._pruned_copy(policy).model
            return accuracy(torch_logits(pruned, self.val_inputs), self.val_labels)
        except Exception:  # a policy that cannot be applied retains nothing
            log.debug("proxy accuracy failed", exc_info=True)
            return 0.0

    def channel_gate(self, seed: int) -> ChannelGate:
        from pipeline.search.channel_gate import ChannelGate

        return ChannelGate(self.model, self.splits, self.input_shape, seed)

    def close(self) -> None:
        self.worker.close()


def build_evaluator(
    model: nn.Module,
    splits: Splits,
    profile: TargetProfile,
    original_onnx: Path,
    finetune: TrainSpec,
    budget_ms: float | None,
    cache: MeasurementCache | None = None,
    timeout_s: float = 120.0,
    latency_model: bool = True,
    latency_source: str = "measured",
) -> CandidateEvaluator:
    """Measure the original (latency on the target, validation accuracy), build the search
    space around it, and return an evaluator ready for agents. `original_onnx` must exist.

    With `latency_source="flops"` the search measures nothing more: it sees FLOPs scaled to
    the original's latency, and as FLOPs know nothing of precisions, every layer stays FP32.
    """
    from pipeline.search.space import build_space

    # The evaluator keeps this worker: starting a measuring process takes seconds.
    worker = MeasureWorker(profile, timeout_s)
    try:
        latency = worker.measure(original_onnx)["latency_ms"][profile.measure.statistic]
        val_inputs, val_labels = stack(splits.val)
        original_accuracy = accuracy(torch_logits(model, val_inputs), val_labels)
        space = build_space(
            model,
            profile,
            original_onnx,
            budget_ms=budget_ms,
            original_accuracy=original_accuracy,
            original_latency_ms=latency,
        )
        if latency_source == "flops":
            space = dataclasses.replace(space, precisions=(Precision.FP32,))
        evaluator = CandidateEvaluator(
            model,
            splits,
            profile,
            space,
            finetune,
            cache,
            timeout_s,
            latency_model=latency_model,
            latency_source=latency_source,
            worker=worker,
        )
        if latency_source == "flops":
            measured = {Precision.FP32.value: latency}
        else:
            measured = evaluator.measure_uniform_precisions()
    except BaseException:
        worker.close(kill=True)
        raise
    evaluator.space = dataclasses.replace(space, precision_latency_ms=measured)
    return evaluator


def _model_id(key: str, policy: Policy) -> str:
    """What determines a candidate's trained weights: its architecture and precisions (the
    measurement key), which channels are kept (channel scores) and which blocks are gone."""
    payload = {"key": key, "scores": policy.channel_scores, "removed": list(policy.removed)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
