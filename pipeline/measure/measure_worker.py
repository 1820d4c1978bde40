"""Latency measurement in a separate process with a timeout.

A runtime that crashes (a segfault in a kernel) or hangs must not take the search down: the
worker is a persistent child process; a job that overruns its timeout or kills the worker is
reported as a failure and the worker is restarted for the next job.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipeline.core.errors import MeasurementError, first_line
from pipeline.core.profile import TargetProfile
from pipeline.measure.child import ChildDied, ChildTimeout, answer_requests, ask_child, stop_child


def _serve(conn: Connection, profile_data: dict[str, Any]) -> None:
    """Child process: measure each artifact path received, answer (ok, result or message)."""
    from pipeline.measure.bench import bench_artifact

    profile = TargetProfile.model_validate(profile_data)
    answer_requests(
        conn,
        lambda path: bench_artifact(profile, Path(path)),
        lambda exc: f"{type(exc).__name__}: {first_line(exc)}",
    )


class MeasureWorker:
    """A persistent measuring process for one profile."""

    def __init__(self, profile: TargetProfile, timeout_s: float = 120.0) -> None:
        self.profile = profile
        self.timeout_s = timeout_s
        self._ctx = mp.get_context("spawn")  # no fork: the parent holds torch's thread pools
        self._proc: Any = None
        self._conn: Connection | None = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=_serve, args=(child, self.profile.model_dump(mode="json")), daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent

    def start(self) -> None:
        """Start the measuring process now, else the first `measure` waits for it."""
        if self._proc is None or not self._proc.is_alive():
            self._start()

    def measure(self, artifact: Path) -> dict[str, Any]:
        """bench_artifact's result for `artifact`, or MeasurementError on crash/timeout/error."""
        self.start()
        assert self._conn is not None
        try:
            status, payload = ask_child(self._proc, self._conn, str(artifact), self.timeout_s)
        except ChildTimeout:
            self.close(kill=True)
            raise MeasurementError(f"measurement timed out after {self.timeout_s:.0f} s") from None
        except ChildDied as died:
            self.close(kill=True)
            raise MeasurementError(f"the runner process died ({died})") from None
        if status != "ok":
            raise MeasurementError(payload)
        return payload

    def close(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        stop_child(self._proc, self._conn, kill)
        self._proc, self._conn = None, None

    def __enter__(self) -> MeasureWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
