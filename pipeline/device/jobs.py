"""The agent's jobs: one at a time, in a separate process, killed when they overrun.

Like `pipeline.measure.measure_worker`, the runtime lives in a persistent child process
(spawned, never forked): a runtime that hangs or crashes costs one job, not the agent. The child
imports the runtimes and announces itself ready before any job is sent, so a job's timeout counts
the job only, not the start-up of a fresh child. A lock serialises every job, so two measurements
never share the device.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import sha256_file, write_json
from pipeline.core.errors import first_line
from pipeline.device import probe
from pipeline.device.workdir import JobFolders
from pipeline.measure.child import ChildDied, ChildTimeout, answer_requests, ask_child, stop_child
from pipeline.measure.device_protocol import (
    ENGINE_NAME,
    MODEL_NAME,
    load_profile_data,
)

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 300.0
PROFILE_FILE = "profile.json"
RESULT_FILE = "result.json"


class JobTimeout(Exception):
    """The job ran past the agent's job timeout; its process was killed."""


class JobFailed(Exception):
    """The job raised (`error_type` names the exception) or its process died."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


# --------------------------------------------------------------------------- child process


def _exit_with_parent(parent_pid: int) -> None:
    """Leave when the agent is gone (killed with SIGKILL, it cannot close the pipe politely)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


class _Handlers:
    """The child's side: measure an artifact, or run a batch through a cached runner."""

    def __init__(self) -> None:
        self._runner: Any = None
        self._runner_job: str | None = None

    def __call__(self, message: tuple[str, dict[str, Any]]) -> Any:
        """Answer one (kind, payload) request."""
        kind, payload = message
        return {"measure": self.measure, "infer": self.infer}[kind](payload)

    def measure(self, payload: dict[str, Any]) -> dict[str, Any]:
        from pipeline.measure.bench import measure_artifact

        self.close()  # an idle inference session must not share the device with the timing
        artifact = Path(payload["artifact"])
        profile = load_profile_data(payload["profile"])
        stats = measure_artifact(profile, artifact)
        engine = _keep_built_engine(profile, artifact)
        return {"stats": stats, "engine": str(engine) if engine else None}

    def infer(self, payload: dict[str, Any]) -> np.ndarray:
        from pipeline.measure.runners.registry import get_runner

        if self._runner_job != payload["job_id"]:
            self.close()
            profile = load_profile_data(payload["profile"])
            runner = get_runner(profile, Path(payload["artifact"]))
            runner.activate()
            self._runner, self._runner_job = runner, payload["job_id"]
        return np.asarray(self._runner.infer(payload["feed"]))

    def close(self) -> None:
        if self._runner is not None and self._runner.is_active:
            self._runner.deactivate()
        self._runner, self._runner_job = None, None


def _keep_built_engine(profile: Any, artifact: Path) -> Path | None:
    """Copy the engine the runtime built from the uploaded graph into the job folder.

    Runners that build engines (TensorRT) keep them in a cache keyed by the graph's hash, so
    this activation finds the engine just measured instead of building another. Its metadata
    (`<engine>.json`) comes along. None for runtimes that run the graph as it is.
    """
    from pipeline.measure.runners.registry import get_runner

    runner = get_runner(profile, artifact)
    if ".engine" not in runner.suffixes:
        return None
    with runner:
        built = getattr(runner, "engine_path", None)
    if built is None or Path(built) == artifact:
        return None
    kept = artifact.with_name(ENGINE_NAME)
    shutil.copyfile(built, kept)
    meta = Path(built).with_name(Path(built).name + ".json")
    if meta.is_file():
        shutil.copyfile(meta, kept.with_name(kept.name + ".json"))
    return kept


def _serve(conn: Connection, parent_pid: int) -> None:
    """Child process: announce the runtimes, then answer each (kind, payload) in turn."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the agent, which stops us
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    import pipeline.measure.bench  # noqa: F401  (import the runtimes before saying ready)

    ready = {
        "versions": probe.runtime_versions(),
        "runtimes": probe.usable_runtimes(),
        "job_pid": os.getpid(),
    }
    conn.send(("ready", ready))
    answer_requests(conn, _Handlers(), lambda exc: (type(exc).__name__, first_line(exc)))


# --------------------------------------------------------------------------- parent side


class JobWorker:
    """The persistent job process, restarted after a timeout or a crash."""

    def __init__(self, timeout_s: float, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.ready_info: dict[str, Any] = {}
        self._ctx = mp.get_context("spawn")  # no fork: threads and runtimes do not survive it
        self._proc: Any = None
        self._conn: Connection | None = None

    def start(self) -> dict[str, Any]:
        """Start the child if it is not running and wait until it is ready; its runtimes."""
        if self._proc is not None and self._proc.is_alive():
            return self.ready_info
        self.close(kill=True)
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, os.getpid()), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(self.startup_timeout_s):
            self.close(kill=True)
            raise JobFailed("StartupError", "the job process did not start in time")
        try:
            _, self.ready_info = parent.recv()
        except (EOFError, OSError):
            code = self._proc.exitcode
            self.close(kill=True)
            raise JobFailed(
                "StartupError", f"the job process died at start (exit {code})"
            ) from None
        return self.ready_info

    def run(self, kind: str, payload: dict[str, Any]) -> Any:
        """Run one job in the child; its result.

        Raises:
            JobTimeout: It overran `timeout_s`; the child was killed.
            JobFailed: It raised, or the child died.
        """
        self.start()
        assert self._conn is not None
        try:
            status, result = ask_child(self._proc, self._conn, (kind, payload), self.timeout_s)
        except ChildTimeout:
            self.close(kill=True)
            raise JobTimeout(
                f"the job ran past the agent's job timeout of {self.timeout_s:g} s"
            ) from None
        except ChildDied as died:
            self.close(kill=True)
            raise JobFailed("ProcessDied", f"the job process died ({died})") from None
        if status != "ok":
            raise JobFailed(*result)
        return result

    def close(self, kill: bool = False) -> None:
        """Stop the child: politely, or at once with `kill`."""
        if self._proc is None:
            return
        stop_child(self._proc, self._conn, kill)
        self._proc, self._conn = None, None


def _engine_record(engine: str | None) -> dict[str, Any]:
    """The built engine's hash and its builder metadata (None when no engine was built)."""
    if engine is None:
        return {"engine_sha256": None, "engine_metadata": None}
    path = Path(engine)
    meta = path.with_name(path.name + ".json")
    return {
        "engine_sha256": sha256_file(path),
        "engine_metadata": json.loads(meta.read_text()) if meta.is_file() else None,
    }


class JobRunner:
    """Job folders in the work dir, and the one-at-a-time queue in front of the job process."""

    def __init__(
        self,
        work_dir: Path,
        timeout_s: float,
        keep_jobs: int = 100,
        max_work_bytes: int | None = None,
    ) -> None:
        self.folders = JobFolders(work_dir, keep_jobs, max_work_bytes)
        self.work_dir = self.folders.work_dir
        self.worker = JobWorker(timeout_s)
        self._lock = threading.Lock()

    def start(self) -> dict[str, Any]:
        """Start the job process now, so the first job does not wait for it."""
        with self._lock:
            return self.worker.start()

    def close(self) -> None:
        """Stop the job process; one still running a job after a few seconds is killed."""
        if self._lock.acquire(timeout=5):
            try:
                self.worker.close()
            finally:
                self._lock.release()
        else:  # the agent is stopping: the job in flight cannot report anywhere
            self.worker.close(kill=True)

    # ------------------------------------------------------------------ job folders

    @staticmethod
    def model_path(job_dir: Path) -> Path:
        """The uploaded graph of a job (the server names it, never the client)."""
        return job_dir / MODEL_NAME

    @staticmethod
    def artifact_path(job_dir: Path) -> Path:
        """What the job made: the engine built on the device, else the uploaded graph."""
        engine = job_dir / ENGINE_NAME
        return engine if engine.is_file() else job_dir / MODEL_NAME

    # ------------------------------------------------------------------ jobs

    def measure(self, job_id: str, job_dir: Path, profile: dict[str, Any]) -> dict[str, Any]:
        """Measure the job's model with `profile` (TargetProfile data, validated by the job).

        Returns:
            The record, also written to result.json; its `status` is ok, timeout or error.
        """
        artifact = self.model_path(job_dir)
        record: dict[str, Any] = {
            "job_id": job_id,
            "runtime": profile.get("runtime"),
            "sha256": sha256_file(artifact),
        }
        payload = {"artifact": str(artifact), "profile": profile}
        with self._lock:
            before = probe.health()
            record["started"] = time.time()
            try:
                result = self.worker.run("measure", payload)
                record.update(status="ok", stats=result["stats"])
                record.update(_engine_record(result["engine"]))
            except JobTimeout as exc:
                record.update(status="timeout", error=str(exc))
            except JobFailed as exc:
                record.update(status="error", error_type=exc.error_type, error=str(exc))
            record["finished"] = time.time()
            record["health"] = {"before": before, "after": probe.health()}
        try:
            write_json(job_dir / RESULT_FILE, record)
        except OSError as exc:  # the answer still goes out; only the job's copy is missing
            log.warning("job %s: cannot save %s: %s", job_id, RESULT_FILE, exc)
        return record

    def infer(self, job_id: str, job_dir: Path, feed: np.ndarray) -> np.ndarray:
        """The model's first output for `feed`, run on the device.

        Raises:
            JobTimeout, JobFailed: As `JobWorker.run`.
        """
        profile = json.loads((job_dir / PROFILE_FILE).read_text())
        payload = {
            "job_id": job_id,
            "artifact": str(self.model_path(job_dir)),
            "profile": profile,
            "feed": feed,
        }
        with self._lock:
            return self.worker.run("infer", payload)
