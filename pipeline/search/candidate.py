"""evaluate_candidate: Policy -> prune -> short fine-tune -> export -> latency -> accuracy.

`CandidateEvaluator` holds what every candidate needs (the original model, the data, the
profile, a latency source) and turns each Policy into a CandidateResult. Failures become results
with an error, never exceptions, so the search goes on. The model is built by the run's own
recipe (`pipeline.search.materialize`); latencies come from a `LatencySource`
(`pipeline.search.latency`). `pipeline.search.build.build_evaluator` makes one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from pipeline.core.choice import holds_floor, tied
from pipeline.core.policy import Policy
from pipeline.core.profile import TargetProfile
from pipeline.core.space import CandidateResult, SearchSpace
from pipeline.core.stats import correct_of
from pipeline.core.train_spec import TrainSpec
from pipeline.measure.latency_model import LatencyModel
from pipeline.measure.measure_worker import MeasureWorker
from pipeline.model.data import Splits
from pipeline.model.evaluate import accuracy, stack, torch_logits
from pipeline.model.prune import PruneResult, count_macs_params
from pipeline.search.latency import Built, FlopsLatency, LatencySource, MeasuredLatency
from pipeline.search.materialize import (
    Recovery,
    export_graph,
    latency_calibration,
    layer_precisions,
    materialize,
    recover,
)
from pipeline.search.measurements import MeasurementCache, candidate_key

if TYPE_CHECKING:
    from pipeline.search.channel_gate import ChannelGate

log = logging.getLogger(__name__)


class CandidateEvaluator:
    """Evaluates policies for the search (the `pipeline.core.space.Evaluator` protocol, with
    the `ProxyAccuracy`, `ChannelGating` and `SideBySide` capabilities)."""

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
        measured: MeasuredLatency | None = None,
    ) -> None:
        self.model = model.eval()
        self.splits = splits
        self.profile = profile
        self.space = space
        self.finetune = finetune
        self.recovery = Recovery(finetune, splits.train, self.model, "candidate")
        self.opset = opset
        # The measured source also serves a FLOPs-driven search: confirmation and the final
        # gates measure whatever the search's latencies came from.
        self.measured = measured or MeasuredLatency(
            profile,
            MeasureWorker(profile, timeout_s),
            cache or MeasurementCache(),
            LatencyModel(space) if latency_model and latency_source == "measured" else None,
        )
        self.latency_source = latency_source
        self.source: LatencySource = self.measured
        if latency_source == "flops":  # AMC's proxy, kept for comparison benchmarks
            macs = count_macs_params(self.model, self.input_shape)[0]
            self.source = FlopsLatency(space.original_latency_ms, macs)
        self.val_inputs, self.val_labels = stack(splits.val)
        # Candidates calibrate INT8 on a subset: enough to rank them, and several times faster
        # than the full calibration the deployed model gets.
        self.calib_inputs = latency_calibration(splits, profile)
        # (accuracy, latency) of the measured candidates within the budget: what a new one
        # must beat to become the result (see `_could_win`).
        self._within: list[tuple[float, float]] = []
        self._accuracy_memo: dict[str, tuple[float, int, int]] = {}
        # With `keep_val_correct`, each result's extra holds which validation images it gets
        # right (`val_correct`, bool (N,)), for paired intervals against another model
        # (`pipeline.run.analyze`); off in searches, whose records need only the accuracy.
        self.keep_val_correct = False
        self._val_correct: dict[str, np.ndarray] = {}

    def use_space(self, space: SearchSpace) -> None:
        """Search within another space, such as another budget: benchmarks and tests that sweep
        budgets keep one evaluator and its measurements. The latency model follows, as it
        judges which candidates are clearly over the budget."""
        self.space = space
        if self.latency_model is not None:
            self.latency_model.space = space

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.profile.input.shape)  # type: ignore[return-value]

    @property
    def cache(self) -> MeasurementCache:
        return self.measured.cache

    @property
    def worker(self) -> MeasureWorker:
        return self.measured.worker

    @property
    def latency_model(self) -> LatencyModel | None:
        return self.measured.model

    @property
    def real_measurements(self) -> int:
        return self.measured.counts["measured"]

    @property
    def cached_measurements(self) -> int:
        return self.measured.counts["cached"]

    @property
    def predicted_measurements(self) -> int:
        return self.measured.counts["predicted"]

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
        counts = self.measured.counts
        counts["measured"] = state["real_measurements"]
        counts["cached"] = state["cached_measurements"]
        counts["predicted"] = state.get("predicted_measurements", 0)
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
        x = self.measured.features(pruned, policy)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "candidate.onnx"
            acc, macs, params = self._trained_figures(pruning, policy, key, path)
            built = Built(key, path, macs, x)
            estimate = self.source.latency(built, lambda ms: self._could_win(acc, ms))
        if not np.isfinite(acc):
            raise ValueError("validation accuracy is not finite")
        self._track_best(acc, estimate.ms, estimate.source)
        extra: dict[str, Any] = {"stats": estimate.stats}
        if self.keep_val_correct:
            extra["val_correct"] = self._val_correct.get(_model_id(key, policy))
        return CandidateResult(policy, acc, estimate.ms, macs, params, estimate.source, extra=extra)

    def _trained_figures(
        self, pruning: PruneResult, policy: Policy, key: str, path: Path
    ) -> tuple[float, int, int]:
        """(val accuracy, MACs, params) after the short fine-tune; the graph goes to `path`
        unless its latency is known already.

        Keep ratios that round to the same channel counts give the same pruned model and, with
        the seeded fine-tune, the same accuracy: such repeats are not trained again.
        """
        pruned = pruning.model
        policy_id = _model_id(key, policy)
        if policy_id in self._accuracy_memo:
            if self.cache.get(key) is None:
                self._export(pruned, policy, path)
            return self._accuracy_memo[policy_id]
        # An unpruned candidate (one that only changes precisions) is scored as trained: a
        # short fine-tune at the recovery rate cost ResNet-34 30 points of accuracy
        if not pruning.unchanged:
            recover(pruned, self.recovery)
        self._export(pruned, policy, path)
        acc = self._onnx_accuracy(path, policy_id)
        macs, params = count_macs_params(pruned, self.input_shape)
        self._accuracy_memo[policy_id] = (acc, macs, params)
        return acc, macs, params

    def _pruned_copy(self, policy: Policy) -> PruneResult:
        return materialize(self.model, policy, self.profile, min_keep=self.space.min_keep)

    def recovered_score(self, policy: Policy, recovery: Recovery | None = None) -> float:
        """Validation accuracy of the policy's graph after `recovery` (default: the candidates'
        short fine-tune). Not a search candidate: nothing is measured or remembered."""
        pruning = self._pruned_copy(policy)
        if not pruning.unchanged:
            recover(pruning.model, recovery or self.recovery)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            self._export(pruning.model, policy, path)
            return self._onnx_accuracy(path, "probe")

    def export_untrained(self, policy: Policy, path: Path) -> None:
        """The candidate's graph without its fine-tune: the same latency, for re-measuring it."""
        self._export(self._pruned_copy(policy).model, policy, path)

    def measure_side_by_side(self, policies: list[Policy], rounds: int = 10) -> list[float]:
        """Each policy's graph measured again in one interleaved session of `rounds` beside the
        unpruned model in the fastest precision; returned as the per-round ratio to that model
        times its latency from the search's start, the scale every other candidate was read on
        (the session's own medians when the space has no such latency). The `SideBySide`
        capability; not counted as search candidates."""
        from pipeline.core.policy import Precision, uniform_policy
        from pipeline.core.stats import paired_ratio
        from pipeline.measure.bench import bench_interleaved

        levels = self.space.precision_latency_ms
        keys = [f"policy{i}" for i in range(len(policies))]
        with tempfile.TemporaryDirectory() as tmp:
            graphs = {key: Path(tmp) / f"{key}.onnx" for key in keys}
            for key, policy in zip(keys, policies, strict=True):
                self.export_untrained(policy, graphs[key])
            if levels:
                precision, level = min(levels.items(), key=lambda kv: kv[1])
                graphs["reference"] = Path(tmp) / "reference.onnx"
                reference = uniform_policy(self.model, 1.0, Precision(precision))
                self.export_untrained(reference, graphs["reference"])
            sides = bench_interleaved(self.worker.measure, graphs, rounds)
        if not levels:
            statistic = self.profile.measure.statistic
            return [float(sides[key]["latency_ms"][statistic]) for key in keys]
        base = sides["reference"]["rounds_ms"]
        return [paired_ratio(sides[key]["rounds_ms"], base) * level for key in keys]

    def measure_untrained(self, policy: Policy) -> tuple[dict[str, Any], float | None]:
        """The latency statistics of the policy's graph without its fine-tune (which does not
        change latency), measured on the target or from the cache, and the graph's physical
        floor in ms (None when it cannot be known). Not counted as a search candidate."""
        from pipeline.measure.runners.floor import physical_floor

        pruned = self._pruned_copy(policy).model
        key = candidate_key(pruned, policy, self.profile)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "candidate.onnx"
            self._export(pruned, policy, path)
            floor = physical_floor(self.profile, path)
            built = Built(key, path, 0, self.measured.features(pruned, policy))
            estimate = self.measured.latency(built, lambda ms: True, counted=False)
        return estimate.stats, floor["floor_ms"] if floor else None

    def _export(self, pruned: nn.Module, policy: Policy, path: Path) -> None:
        precisions = layer_precisions(pruned, policy)
        export_graph(pruned, precisions, self.profile, path, self.calib_inputs, self.opset)

    def _onnx_accuracy(self, path: Path, policy_id: str) -> float:
        from exporters import run_onnx

        logits = run_onnx(path, self.val_inputs, threads=self.profile.threads)
        if not np.isfinite(logits).all():
            raise ValueError("the candidate outputs NaN or inf")
        if self.keep_val_correct:
            self._val_correct[policy_id] = correct_of(logits, self.val_labels)
        return accuracy(logits, self.val_labels)

    def _could_win(self, acc: float, latency_ms: float) -> bool:
        """Whether a candidate with this accuracy and latency would be the search's choice
        among the measured ones (`pipeline.core.choice.choose_best`: the most accurate, and among
        accuracies closer than one validation sample, the fastest; with an accuracy floor, the
        fastest that holds it)."""
        floor = self.space.accuracy_floor
        if floor is not None:  # the fastest within the floor is the choice
            rivals = [ms for a, ms in self._within if holds_floor(a, floor)]
            return holds_floor(acc, floor) and (not rivals or latency_ms < min(rivals))
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


def _model_id(key: str, policy: Policy) -> str:
    """What determines a candidate's trained weights: its architecture and precisions (the
    measurement key), which channels are kept (channel scores) and which blocks are gone."""
    payload = {"key": key, "scores": policy.channel_scores, "removed": list(policy.removed)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
