"""RayEvaluator: the search's evaluator when candidates run on a Ray cluster.

Candidates go to `workers` Ray actors (`pipeline.search.parallel.worker`), up to one each; results
come back in submission order as soon as each is complete, so the episode log, the agents'
updates and the checkpoints follow the same order as a local search. The driver records what
each candidate added (measurements, trained accuracies, the evaluator's state) in that order, so
a candidate two workers measured at once counts, as locally, once measured and once cached.

A worker whose process dies is replaced by a new one; its candidate is retried on whichever
worker is free first (at most MAX_ATTEMPTS times, then it is a failed candidate and the search
goes on). Ray's own restarts are off, so that every retry is seen and counted here.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from pipeline.core.errors import RuntimeNotAvailable
from pipeline.core.parallel_config import ParallelConfig, require_ray
from pipeline.core.policy import Policy
from pipeline.core.space import CandidateResult
from pipeline.search.parallel.cluster import connect, first_line, forwarded_env, worker_options
from pipeline.search.parallel.fleet import Fleet
from pipeline.search.parallel.proxy import EvaluatorProxy
from pipeline.search.parallel.worker import Answer, CandidateWorker, Known, WorkerSetup

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # a candidate whose worker died this many times is recorded as failed
MAX_REPLACEMENTS = 3  # a worker replaced this many times in a row is given up
READY_TIMEOUT_S = 600.0  # workers import torch and build their evaluator; a cluster may scale up


_Done = tuple[Answer | CandidateResult, dict[str, Any] | None]  # result, the state it began from


class _Feed:
    """The candidates of one `evaluate_iter`: retried ones first, then new ones as needed."""

    def __init__(self, policies: Iterable[Policy], batch: int) -> None:
        self._source = enumerate(policies)
        self.batch = batch
        self.retry: deque[_Job] = deque()
        self.created = 0
        self.exhausted = False

    def next_job(self) -> _Job | None:
        if self.retry:
            return self.retry.popleft()
        item = None if self.exhausted else next(self._source, None)
        if item is None:
            self.exhausted = True
            return None
        self.created += 1
        return _Job(item[0], item[1], self.batch)


@dataclass
class _Slot:
    """A worker's place in the pool: its actor is replaced when it dies."""

    actor: Any
    pid: int = 0
    deaths: int = 0  # in a row, without a candidate finished in between


@dataclass
class _Job:
    index: int  # position in its batch
    policy: Policy
    batch: int
    attempts: int = 0
    sent: dict[str, Any] | None = None  # the evaluator state its worker started from


class RayEvaluator(EvaluatorProxy):
    """Evaluates candidates on Ray workers; everything else is the driver's evaluator's.

    Args:
        base: The driver's CandidateEvaluator (built and measured as for a local search); it
            keeps the measurement cache, the counters and the state checkpoints save.
        config: `search.parallel`.
    """

    def __init__(self, base: Any, config: ParallelConfig) -> None:
        super().__init__(base, config.workers)
        self._config = config
        self._ray = require_ray()
        self._retries = 0
        self._batch = 0
        self._memo: dict[str, tuple[float, int, int]] = {}
        self._known: tuple[Any, dict[str, Any] | None] | None = None
        self._known_space: Any = None
        self._running: dict[Any, tuple[_Job | None, _Slot]] = {}  # ObjectRef -> (job, slot)
        self._slots: list[_Slot] = []
        self._idle: deque[_Slot] = deque()
        self._fleet: Fleet | None = None
        self._gpus = 0.0  # each worker's share, once started
        self._started_ray = connect(config)
        try:
            self._fleet = Fleet.start(base.profile, base.worker.timeout_s)
            self._start_workers()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ workers

    def _start_workers(self) -> None:
        base, ray = self.base, self._ray
        setup = WorkerSetup(
            profile=base.profile.model_dump(mode="json"),
            space=base.space,
            finetune=base.finetune,
            opset=base.opset,
            timeout_s=base.worker.timeout_s,
            threads=max(int(self._config.cpus_per_worker), 1),
            evaluator_options=_evaluator_options(base),
            device_info=_device_info(base.profile),
        )
        # Held here for the search's lifetime: a replacement worker is built from them again.
        shared = {"model": ray.put(base.model), "splits": ray.put(base.splits)}
        options = worker_options(self._config, forwarded_env(base.profile))
        self._gpus = options["num_gpus"]
        cls = ray.remote(CandidateWorker).options(**options)
        assert self._fleet is not None
        pool = self._fleet.pool
        self._new_worker = lambda: cls.remote(shared, setup, pool)
        self._slots = [_Slot(self._new_worker()) for _ in range(self.workers)]
        for slot, pid in zip(self._slots, self._await_ready(options), strict=True):
            slot.pid = pid
        self._idle = deque(self._slots)

    def _await_ready(self, options: dict[str, Any]) -> list[int]:
        ray = self._ray
        pings = [slot.actor.ready.remote() for slot in self._slots]
        try:
            return ray.get(pings, timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeNotAvailable(
                f"the Ray cluster did not start {self.workers} search workers of "
                f"{options['num_cpus']:g} CPU(s) and {options['num_gpus']:g} GPU(s) in "
                f"{READY_TIMEOUT_S:.0f} s (it has {ray.cluster_resources()}); lower "
                "search.parallel.workers or cpus_per_worker"
            ) from None
        except ray.exceptions.RayError as exc:
            reason = first_line(exc)
            raise RuntimeNotAvailable(f"a search worker could not start: {reason}") from None

    def worker_pids(self) -> list[int]:
        """Process ids of the workers (0 for a replacement not up yet)."""
        return [slot.pid for slot in self._slots]

    def busy_pids(self) -> list[int]:
        """Process ids of the workers evaluating a candidate now."""
        return [slot.pid for job, slot in list(self._running.values()) if job is not None]

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, policy: Policy) -> CandidateResult:
        return next(self.evaluate_iter([policy]))

    def evaluate_many(self, policies: Iterable[Policy]) -> list[CandidateResult]:
        return list(self.evaluate_iter(policies))

    def evaluate_iter(self, policies: Iterable[Policy]) -> Iterator[CandidateResult]:
        """Evaluate candidates on the workers; yield their results in submission order, each
        as soon as it and those before it are complete.

        `policies` is read lazily, one policy whenever a worker is free: an agent may draw
        its next candidate only then (the random agent does), keeping every worker busy.
        """
        self._batch += 1  # results of an abandoned batch are dropped when they arrive
        feed = _Feed(policies, self._batch)
        done: dict[int, _Done] = {}
        index = 0
        while True:
            self._submit(feed)
            if index in done:
                yield self._record(done.pop(index))
                index += 1
            elif feed.exhausted and index >= feed.created:
                return
            else:
                self._collect(feed.retry, done)

    def _submit(self, feed: _Feed) -> None:
        while self._idle:
            job = feed.next_job()
            if job is None:
                return
            slot = self._idle.popleft()
            known, job.sent = self._known_ref()
            self._running[slot.actor.evaluate.remote(job.policy, known)] = (job, slot)

    def _collect(self, queue: deque[_Job], done: dict[int, _Done]) -> None:
        ray = self._ray
        if not self._running:
            raise RuntimeNotAvailable(
                "every search worker of the Ray cluster is gone; when the cluster is back, "
                "continue with `pipeline run --target PROFILE --resume RUN_DIR`"
            )
        ready, _ = ray.wait(list(self._running), num_returns=1)
        for ref in ready:
            job, slot = self._running.pop(ref)
            try:
                answer = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                self._worker_died(job, slot, first_line(exc), queue, done)
                continue
            except ray.exceptions.RayError as exc:  # the task itself broke: a failed candidate
                answer = _failed(job.policy, first_line(exc)) if job else slot.pid
            if job is None:  # a replacement worker is up
                slot.pid = answer
            elif job.batch == self._batch:
                slot.deaths = 0
                done[job.index] = (answer, job.sent)
            self._idle.append(slot)

    def _worker_died(
        self, job: _Job | None, slot: _Slot, reason: str, queue: deque[_Job], done: dict[int, _Done]
    ) -> None:
        """Retry the candidate on the first worker free, and replace the dead worker."""
        if job is not None and job.batch == self._batch:
            self._retries += 1
            job.attempts += 1
            if job.attempts >= MAX_ATTEMPTS:
                done[job.index] = (_failed(job.policy, f"worker died {job.attempts} times"), None)
            else:
                log.warning("a search worker died (%s); its candidate is retried", reason)
                queue.appendleft(job)
        self._ray.kill(slot.actor)  # whatever is left of it
        slot.deaths += 1
        if slot.deaths > MAX_REPLACEMENTS:
            log.warning("a search worker keeps dying (%s); the search goes on without it", reason)
            self._slots.remove(slot)
            return
        slot.actor, slot.pid = self._new_worker(), 0  # its pid is known once it is up
        self._running[slot.actor.ready.remote()] = (None, slot)  # to work then

    # ------------------------------------------------------------------ recording

    def _known_ref(self) -> tuple[Any, dict[str, Any] | None]:
        """What the driver knows now, put in the object store once per change (a recorded
        candidate, or a new search space such as another budget)."""
        base = self.base
        if self._known is None or self._known_space is not base.space:
            state = copy.deepcopy(base.state()) if hasattr(base, "state") else None
            known = Known(dict(base.cache.entries), dict(self._memo), state, base.space)
            self._known, self._known_space = (self._ray.put(known), state), base.space
        return self._known

    def _record(self, item: _Done) -> CandidateResult:
        """A finished candidate, recorded as a local search would have recorded it."""
        answer, sent = item
        if isinstance(answer, CandidateResult):  # failed here, never answered
            return answer
        self._known = None
        base = self.base
        # The evaluator's counters, by the source of a candidate's latency: counted here by the
        # source recorded, not by what the worker's state says
        counts = base.measured.counts
        before = dict(counts)
        if answer.state is not None and sent is not None:
            base.restore(merge_state(base.state(), sent, answer.state))
        result = self._reconcile(answer)
        counts.update(before)
        if result.source in counts:
            counts[result.source] += 1
        return result

    def _reconcile(self, answer: Answer) -> CandidateResult:
        """Trained accuracies and measurements the driver already had (from a candidate still
        in flight when this one was sent) win, as they would have locally."""
        result = answer.result
        for model_id, value in answer.accuracy.items():
            known = self._memo.setdefault(model_id, value)
            if known != value and result.error is None:
                result = replace(result, accuracy=known[0], macs=known[1], params=known[2])
        if result.error is not None or answer.key is None:
            return result
        cache = self.base.cache
        stats = cache.get(answer.key)
        if stats is None:
            for key, measured in answer.latency.items():
                cache.put(key, measured)
        elif result.source in ("measured", "predicted"):
            latency = stats[self.base.profile.measure.statistic]
            extra = {**result.extra, "stats": stats}
            result = replace(result, latency_ms=latency, source="cached", extra=extra)
        return result

    # ------------------------------------------------------------------ reporting, closing

    @property
    def retries(self) -> int:
        """Candidates retried after their worker died."""
        return self._retries

    def describe(self) -> dict[str, Any]:
        """For report.json's `search.parallel`."""
        return {
            "backend": "ray",
            "workers": self.workers,
            "address": self._config.address,
            "cpus_per_worker": self._config.cpus_per_worker,
            "gpus_per_worker": self._gpus,
            "retried_candidates": self._retries,
            "devices": self._fleet.status() if self._fleet else None,
        }

    def device_timelines(self) -> dict[str, list[tuple[float, float]]]:
        """Each device's measurements as (start, end) times (see `Fleet.timelines`)."""
        return self._fleet.timelines() if self._fleet else {}

    def close(self) -> None:
        """Stop the workers and the devices' actors, then the driver's evaluator (and Ray, when
        this evaluator started it)."""
        ray = self._ray
        for slot in self._slots:
            ray.kill(slot.actor)
        self._slots = []
        if self._fleet is not None:
            self._fleet.close()
            self._fleet = None
        self.base.close()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def merge_state(current: Any, sent: Any, theirs: Any) -> Any:
    """The driver's evaluator state `current` with the changes a worker made to `sent`.

    Workers started from the state at submission; their changes are applied in submission
    order: what a worker appended to a list (the measurements a latency model learns from) is
    appended, numbers keep the larger value (running bests; counters are recounted), anything
    else takes the worker's value when it changed it. With one worker, `current` is `sent` and
    the result is exactly the worker's state.
    """
    if isinstance(theirs, dict) and isinstance(current, dict) and isinstance(sent, dict):
        merged = dict(current)
        for key, value in theirs.items():
            merged[key] = merge_state(current.get(key), sent.get(key), value)
        return merged
    if theirs == sent:
        return current
    if _is_extension(current, sent, theirs):
        return [*current, *theirs[len(sent) :]]
    if _is_number(current) and _is_number(theirs):
        return max(current, theirs)
    return theirs


def _is_extension(current: Any, sent: Any, theirs: Any) -> bool:
    lists = all(isinstance(x, list) for x in (current, sent, theirs))
    return lists and theirs[: len(sent)] == sent


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _failed(policy: Policy, reason: str) -> CandidateResult:
    return CandidateResult(policy, 0.0, None, source="failed", error=f"WorkerDied: {reason}")


def _evaluator_options(base: Any) -> dict[str, Any]:
    """Constructor keywords that make a worker's evaluator behave like the driver's."""
    return {"latency_model": base.latency_model is not None, "latency_source": base.latency_source}


def _device_info(profile: Any) -> dict[str, Any] | None:
    from pipeline.measure.device_client import device_info

    return device_info(profile) if profile.fleet else None
