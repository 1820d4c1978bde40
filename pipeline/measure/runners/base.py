"""The runner interface every latency backend implements, and the statistics it returns.

Like Polygraphy's runners: a public method checks the runner's state and its arguments, then a
`_*_impl` hook does the work. Subclasses implement the hooks only.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from pipeline.core.errors import ModelError
from pipeline.core.files import ENGINE_MAX_BYTES, ONNX_MAX_BYTES, check_file
from pipeline.core.profile import TargetProfile

MIN_REPEATS = 30
STATISTICS = ("median", "p90", "mean")


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one inference of a whole batch, in milliseconds.

    `std_ms` is the population standard deviation (numpy's default, ddof=0) and `cv` is
    `std_ms / mean_ms`, the coefficient of variation the report uses to flag noisy measurements.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    cv: float
    warmup: int
    repeats: int
    batch: int

    @classmethod
    def from_samples(cls, samples_s: Sequence[float], warmup: int, batch: int) -> LatencyStats:
        """Summarise timed runs.

        Args:
            samples_s: Duration of each timed run, in seconds.
            warmup: How many untimed runs preceded them.
            batch: Batch size of each run.

        Returns:
            The statistics in milliseconds; `repeats` is the number of samples.

        Raises:
            ValueError: No samples, or a sample that is negative, NaN or infinite.
        """
        ms = np.asarray(samples_s, dtype=np.float64) * 1e3
        if ms.size == 0:
            raise ValueError("no latency samples to summarise")
        if not np.all(np.isfinite(ms)) or np.any(ms < 0):
            raise ValueError("latency samples must be finite and non-negative")
        mean = float(np.mean(ms))
        std = float(np.std(ms))
        return cls(
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=mean,
            min_ms=float(np.min(ms)),
            max_ms=float(np.max(ms)),
            std_ms=std,
            cv=std / mean if mean > 0 else 0.0,
            warmup=int(warmup),
            repeats=int(ms.size),
            batch=int(batch),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyStats:
        """Rebuild from `to_dict()` output; extra keys (e.g. `floor_ms`) are ignored.

        Raises:
            ValueError: A field is missing.
        """
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"latency stats lack key(s): {', '.join(missing)}")
        return cls(**{n: data[n] for n in names})

    def value(self, statistic: str) -> float:
        """The statistic the search optimises: `median`, `p90` or `mean` (milliseconds).

        Raises:
            ValueError: An unknown statistic.
        """
        if statistic not in STATISTICS:
            raise ValueError(
                f"unknown statistic '{statistic}'; use one of: {', '.join(STATISTICS)}"
            )
        return float(getattr(self, f"{statistic}_ms"))


def profile_input(profile: TargetProfile, batch: int | None = None) -> np.ndarray:
    """The fixed input every measurement uses: float32 normal noise seeded 0.

    Args:
        profile: Gives the (C, H, W) shape and the default batch size.
        batch: Overrides the profile's batch size.

    Returns:
        Array of shape (B, C, H, W), float32, identical on every call.
    """
    b = profile.input.batch if batch is None else batch
    rng = np.random.default_rng(0)
    return rng.standard_normal((b, *profile.input.shape), dtype=np.float32)


class Runner:
    """Loads one artifact for one target profile, runs it and measures its latency.

    Use as a context manager (`with get_runner(profile, path) as runner: ...`) or call
    `activate()` / `deactivate()` yourself.

    Subclasses implement `_activate_impl`, `_infer_impl` and `_deactivate_impl`; they may
    override `_timed_run_impl` to time only the device work (e.g. without host copies).
    """

    runtime: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = (".onnx",)

    def __init__(self, artifact: Path, profile: TargetProfile) -> None:
        """Check the artifact exists and suits this runtime; nothing is loaded yet.

        Raises:
            ModelError: The file is missing or has a suffix this runtime cannot run.
        """
        self.artifact = Path(artifact)
        self.profile = profile
        self._active = False
        limit = ENGINE_MAX_BYTES if self.artifact.suffix == ".engine" else ONNX_MAX_BYTES
        check_file(self.artifact, "artifact", ModelError, limit)
        if self.suffixes and self.artifact.suffix not in self.suffixes:
            wanted = " or ".join(self.suffixes)
            raise ModelError(
                f"{self.artifact}: runtime '{self.runtime or self.name}' runs {wanted} files; "
                f"give a {wanted} artifact or a profile for a runtime that runs this one"
            )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this runner cannot run on this machine (e.g. no GPU), or None when it can."""
        return None

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> None:
        """Load the artifact (create the session, build or deserialise the engine).

        Raises:
            RuntimeError: The runner is already active.
            ModelError: The artifact cannot be loaded.
        """
        if self._active:
            raise RuntimeError(f"{self.name} is already active; call deactivate() first")
        self._activate_impl()
        self._active = True

    def infer(self, feed: np.ndarray) -> np.ndarray:
        """Run one batch and return the model's first output (the logits).

        Args:
            feed: Float32 array of shape (B, C, H, W).

        Returns:
            The logits, shape (B, num_classes) for a classifier.

        Raises:
            RuntimeError: The runner is not active.
            ValueError: `feed` is not a 4-D float32 array.
        """
        self._require_active("infer")
        _check_feed(feed)
        return self._infer_impl(feed)

    def measure(self, warmup: int | None = None, repeats: int | None = None) -> LatencyStats:
        """Time the profile's input: `warmup` untimed runs, then `repeats` timed runs.

        Args:
            warmup: Untimed runs first (defaults to the profile's `measure.warmup`).
            repeats: Timed runs, at least 30 (defaults to the profile's `measure.repeats`).

        Returns:
            Statistics of the per-run wall time measured with `time.perf_counter_ns`.

        Raises:
            RuntimeError: The runner is not active.
            ValueError: `repeats` below 30 or `warmup` below 1.
        """
        self._require_active("measure")
        warmup, repeats = self._measure_settings(warmup, repeats)
        feed = profile_input(self.profile)
        for _ in range(warmup):
            self._timed_run_impl(feed)
        samples = _time_runs(self._timed_run_impl, feed, repeats)
        return LatencyStats.from_samples(samples, warmup=warmup, batch=feed.shape[0])

    def deactivate(self) -> None:
        """Release the session or engine.

        Raises:
            RuntimeError: The runner is not active.
        """
        self._require_active("deactivate")
        try:
            self._deactivate_impl()
        finally:
            self._active = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._active:
            self.deactivate()

    def _measure_settings(self, warmup: int | None, repeats: int | None) -> tuple[int, int]:
        """(warmup, repeats): the profile's where not given, checked for stable statistics."""
        warmup = self.profile.measure.warmup if warmup is None else warmup
        repeats = self.profile.measure.repeats if repeats is None else repeats
        if repeats < MIN_REPEATS:
            raise ValueError(
                f"repeats must be at least {MIN_REPEATS} for stable stats, got {repeats}"
            )
        if warmup < 1:
            raise ValueError(
                f"warmup must be at least 1 (first runs pay for allocation), got {warmup}"
            )
        return warmup, repeats

    def _require_active(self, method: str) -> None:
        if not self._active:
            raise RuntimeError(
                f"{self.name}.{method}() called before activate(); "
                "call activate() or use the runner as a context manager"
            )

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, feed: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        raise NotImplementedError

    def _timed_run_impl(self, feed: np.ndarray) -> None:
        """One run as timed by `measure`; must not return before the work is finished."""
        self._infer_impl(feed)


def _check_feed(feed: np.ndarray) -> None:
    if not isinstance(feed, np.ndarray):
        raise ValueError(f"feed must be a numpy array, got {type(feed).__name__}")
    if feed.ndim != 4 or feed.dtype != np.float32:
        raise ValueError(
            f"feed must be float32 of shape (B, C, H, W), got {feed.dtype} of shape {feed.shape}"
        )


def _time_runs(run: Callable[[np.ndarray], None], feed: np.ndarray, repeats: int) -> list[float]:
    """Wall time of each run in seconds."""
    samples: list[float] = []
    # A garbage collection inside a timed run would charge Python's pauses to the model.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter_ns()
            run(feed)
            samples.append((time.perf_counter_ns() - start) * 1e-9)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples
