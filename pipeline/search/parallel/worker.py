"""A search worker: a Ray actor that builds its own CandidateEvaluator once and evaluates the
candidates the driver sends it (a pure function of plain data: a Policy in, a result out).

The driver stays the one place that knows what has been measured and trained: with each
candidate it sends what it knows (`Known`), the worker decides exactly as the driver's own
evaluator would with that knowledge, and answers what it learnt (`Answer`) for the driver to
record in submission order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.core.policy import Policy
from pipeline.core.profile import TargetProfile
from pipeline.core.space import CandidateResult, SearchSpace
from pipeline.core.train_spec import TrainSpec
from pipeline.model.data import Splits
from pipeline.search.candidate import CandidateEvaluator
from pipeline.search.measurements import MeasurementCache


@dataclass(frozen=True)
class Known:
    """What the driver knows when it sends a candidate."""

    latency: dict[str, dict[str, Any]]  # measurement cache: candidate key -> statistics
    accuracy: dict[str, tuple[float, int, int]]  # model id -> (accuracy, MACs, params)
    state: dict[str, Any] | None  # the evaluator's `state()` (counters, latency model, ...)
    space: SearchSpace  # as the driver has it now (its budget may change after the start)


@dataclass(frozen=True)
class Answer:
    """A candidate's result and what its evaluation added to the driver's knowledge."""

    result: CandidateResult
    key: str | None  # its measurement key; None when it failed before one was known
    latency: dict[str, dict[str, Any]]  # measured here
    accuracy: dict[str, tuple[float, int, int]]  # trained here
    state: dict[str, Any] | None  # the evaluator's state after this candidate


@dataclass(frozen=True)
class WorkerSetup:
    """Everything but the model and data (sent apart, once, through Ray's object store)."""

    profile: dict[str, Any]
    space: SearchSpace
    finetune: TrainSpec
    opset: int
    timeout_s: float
    threads: int
    evaluator_options: dict[str, Any]  # further keywords of CandidateEvaluator
    device_info: dict[str, Any] | None  # the first device's GET /info, for candidate keys


class _KeyedCache(MeasurementCache):
    """The driver's measurements, in memory; remembers the key looked up last, which is the
    candidate's (the evaluator looks it up before measuring)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.last_key: str | None = None

    def get(self, key: str) -> dict[str, Any] | None:
        self.last_key = key
        return super().get(key)


class WorkerEvaluator(CandidateEvaluator):
    """A CandidateEvaluator that measures through the fleet and starts each candidate from the
    driver's knowledge instead of its own."""

    def __init__(self, model: nn.Module, splits: Splits, setup: WorkerSetup, measurer: Any) -> None:
        self.keyed = _KeyedCache()
        super().__init__(
            model,
            splits,
            TargetProfile.model_validate(setup.profile),
            setup.space,
            setup.finetune,
            cache=self.keyed,
            timeout_s=setup.timeout_s,
            opset=setup.opset,
            **setup.evaluator_options,
        )
        self.worker.close()  # never started: the fleet measures instead
        self.measured.worker = measurer

    def answer(self, policy: Policy, known: Known) -> Answer:
        """Evaluate `policy` as the driver's evaluator would, knowing what it knows."""
        if known.space != self.space:
            self.use_space(known.space)
        self.keyed.entries = dict(known.latency)
        self.keyed.last_key = None
        self._accuracy_memo = dict(known.accuracy)
        if known.state is not None:
            self.restore(known.state)
        result = self.evaluate(policy)
        return Answer(
            result=result,
            key=self.keyed.last_key,
            latency={k: v for k, v in self.keyed.entries.items() if k not in known.latency},
            accuracy={k: v for k, v in self._accuracy_memo.items() if k not in known.accuracy},
            state=self.state() if known.state is not None else None,
        )


class CandidateWorker:
    """The Ray actor around a WorkerEvaluator (replaced by the driver when its process dies)."""

    def __init__(self, shared: dict[str, Any], setup: WorkerSetup, pool: Any) -> None:
        """`shared` holds the object references of the model and the data, put in the object
        store once by the driver, which keeps them alive for replacement workers."""
        import ray
        import torch

        from pipeline.measure.device_client import remember_device_info
        from pipeline.model.finetune import set_train_device
        from pipeline.search.parallel.fleet import FleetMeasurer

        # Fine-tunes are only reproducible at a fixed thread count: the worker's CPU share.
        torch.set_num_threads(setup.threads)
        if ray.get_gpu_ids() and torch.cuda.is_available():
            set_train_device("cuda")
        if setup.device_info is not None:
            remember_device_info(TargetProfile.model_validate(setup.profile), setup.device_info)
        model, splits = ray.get([shared["model"], shared["splits"]])
        self.evaluator = WorkerEvaluator(model, splits, setup, FleetMeasurer(pool))

    def ready(self) -> int:
        """This worker's process id, once its evaluator is built."""
        return os.getpid()

    def evaluate(self, policy: Policy, known: Known) -> Answer:
        return self.evaluator.answer(policy, known)
