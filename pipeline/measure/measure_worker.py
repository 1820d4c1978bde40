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

from pipeline.core.errors import (
    ConfigError,
    DataError,
    MeasurementError,
    ModelError,
    PipelineError,
    PolicyError,
    RuntimeNotAvailable,
    first_line,
)
from pipeline.core.profile import TargetProfile
from pipeline.measure.child import ChildDied, ChildTimeout, answer_requests, ask_child, stop_child

# Bad input found in the child (a graph onnxruntime cannot load) keeps its type across the pipe
_TYPED: dict[str, type[PipelineError]] = {
    cls.__name__: cls
    for cls in (ConfigError, DataError, ModelError, PolicyError, RuntimeNotAvailable)
}


def _describe(exc: Exception) -> dict[str, str]:
    return {
        "kind": type(exc).__name__,
        "text": first_line(exc),
        "message": f"{type(exc).__name__}: {first_line(exc)}",
    }


STARTUP_TIMEOUT_S = 600.0
"""How long the measuring process may take to start (its imports), apart from each job's
timeout: on a busy machine starting can take longer than a measurement is allowed to."""


def _serve(conn: Connection, profile_data: dict[str, Any]) -> None:
    """Child process: say it is ready once its imports are done, then measure each artifact
    path received and answer (ok, result or error)."""
    from pipeline.measure.bench import bench_artifact

    profile = TargetProfile.model_validate(profile_data)
    conn.send(("ready", None))
    answer_requests(conn, lambda path: bench_artifact(profile, Path(path)), _describe)


class MeasureWorker:
    """A persistent measuring process for one profile.

    By default every failure is a `MeasurementError` (a search records it and goes on); with
    `typed_errors`, bad input the child finds (a graph that cannot be loaded) is raised as its
    own `PipelineError`, as `pipeline bench` reports it.
    """

    def __init__(
        self, profile: TargetProfile, timeout_s: float = 120.0, typed_errors: bool = False
    ) -> None:
        self.profile = profile
        self.timeout_s = timeout_s
        self.typed_errors = typed_errors
        self._ctx = mp.get_context("spawn")  # no fork: the parent holds torch's thread pools
        self._proc: Any = None
        self._conn: Connection | None = None
        self._ready = False

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=_serve, args=(child, self.profile.model_dump(mode="json")), daemon=True
        )
        self._proc.start()
        child.close()
        self._conn, self._ready = parent, False

    def _await_ready(self) -> None:
        """Wait for the process to start (STARTUP_TIMEOUT_S), so that a job's timeout counts
        the job alone."""
        if self._ready:
            return
        assert self._conn is not None
        try:
            if not self._conn.poll(STARTUP_TIMEOUT_S):
                raise MeasurementError(
                    f"the measuring process did not start within {STARTUP_TIMEOUT_S:.0f} s"
                )
            self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            self.close(kill=True)
            raise MeasurementError(
                f"the runner process died while starting (exit code {code})"
            ) from None
        except MeasurementError:
            self.close(kill=True)
            raise
        self._ready = True

    def start(self) -> None:
        """Start the measuring process now, else the first `measure` waits for it."""
        if self._proc is None or not self._proc.is_alive():
            self._start()

    def measure(self, artifact: Path) -> dict[str, Any]:
        """bench_artifact's result for `artifact`, or MeasurementError on crash/timeout/error."""
        self.start()
        self._await_ready()
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
            typed = _TYPED.get(payload["kind"]) if self.typed_errors else None
            raise typed(payload["text"]) if typed else MeasurementError(payload["message"])
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
