"""The agent's job folders: one per job, named by a random id, pruned by count and by size.

Old folders go first (least recently used), and never one whose job is in use: an upload in
progress, a measurement or an inference. A disk that is full, or a work folder at its size cap
that cannot be pruned further, refuses the new job with `WorkDirFull` (HTTP 507); the next job
after space is freed needs nothing from anyone, since every job checks afresh.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.measure.device_protocol import JOB_ID_BYTES, is_job_id

MIB = 2**20
# Left free on the disk beside an upload: room for the job's record and the engine's metadata.
DISK_RESERVE_BYTES = 1 * MIB
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class WorkDirFull(Exception):
    """No room for a job: the disk is full, or the folder is at --max-work-mb with every job in
    it in use."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_message(work_dir: Path) -> str:
    return (
        f"no space left on the device's disk for the agent's jobs in {work_dir}; "
        "free space there (old jobs are pruned as new ones come)"
    )


def _folder_bytes(path: Path) -> int:
    """The bytes of the files in one job folder (jobs hold files only, no subfolders)."""
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    except OSError:  # pruned meanwhile
        return 0
    return total


class JobFolders:
    """Job folders in the work dir; thread-safe (uploads run on the event loop's threads)."""

    def __init__(self, work_dir: Path, keep_jobs: int = 100, max_bytes: int | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keep_jobs = keep_jobs
        self.max_bytes = max_bytes
        self._in_use: dict[str, int] = {}
        # Order of creation and use, for folders whose times tie (the kernel's clock is coarse).
        self._used: dict[str, int] = {}
        self._clock = itertools.count()
        self._lock = threading.Lock()

    def new_job(self, needed_bytes: int = 0) -> tuple[str, Path]:
        """A fresh job id and its empty folder, in use until `release`; old jobs make room.

        Raises:
            WorkDirFull: Pruning every job not in use leaves less than `needed_bytes`.
        """
        with self._lock:
            total = self._prune(needed_bytes)
            self._check_room(total, needed_bytes)
            job_id = secrets.token_hex(JOB_ID_BYTES)
            job_dir = self.work_dir / job_id
            try:
                job_dir.mkdir(mode=0o700)
            except OSError as exc:
                if is_disk_full(exc):
                    raise WorkDirFull(disk_full_message(self.work_dir)) from None
                raise
            self._in_use[job_id] = 1
            self._used[job_id] = next(self._clock)
        return job_id, job_dir

    def room(self) -> int:
        """The bytes a job may still write: under the size cap and on the disk."""
        with self._lock:
            room = self._disk_room()
            if self.max_bytes is not None:
                room = min(room, self.max_bytes - self._total())
            return max(0, room)

    @contextmanager
    def using(self, job_id: str) -> Iterator[Path | None]:
        """The job's folder, kept from pruning while in use; None when there is no such job."""
        with self._lock:
            path = self._existing(job_id)
            if path is not None:
                self._in_use[job_id] = self._in_use.get(job_id, 0) + 1
                self._used[job_id] = next(self._clock)
                os.utime(path)  # used now: the last to be pruned
        try:
            yield path
        finally:
            if path is not None:
                self.release(job_id)

    def release(self, job_id: str) -> None:
        """The job is no longer in use (by the caller of `new_job` or `using`)."""
        with self._lock:
            left = self._in_use.get(job_id, 0) - 1
            if left > 0:
                self._in_use[job_id] = left
            else:
                self._in_use.pop(job_id, None)

    def job_dir(self, job_id: str) -> Path | None:
        """The folder of an existing job; None for anything that is not a job id we made."""
        with self._lock:
            return self._existing(job_id)

    def discard(self, job_id: str) -> None:
        """Remove the job's folder and forget it (a failed upload)."""
        with self._lock:
            path = self._existing(job_id)
            self._in_use.pop(job_id, None)
            self._used.pop(job_id, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ under the lock

    def _existing(self, job_id: str) -> Path | None:
        if not is_job_id(job_id):
            return None
        path = self.work_dir / job_id
        return path if path.is_dir() else None

    def _jobs(self) -> list[Path]:
        """Every job folder, least recently used first."""
        found = []
        for path in self.work_dir.iterdir():
            try:
                if path.is_dir() and is_job_id(path.name):
                    key = (path.stat().st_mtime_ns, self._used.get(path.name, -1))
                    found.append((key, path))
            except OSError:
                continue
        return [path for _, path in sorted(found)]

    def _total(self) -> int:
        return sum(_folder_bytes(path) for path in self._jobs())

    def _disk_room(self) -> int:
        return shutil.disk_usage(self.work_dir).free - DISK_RESERVE_BYTES

    def _prune(self, needed: int) -> int:
        """Remove the oldest jobs not in use until a new one of `needed` bytes fits by count,
        size cap and free disk, or none is left to remove; the total bytes kept."""
        jobs = self._jobs()
        sizes = {path: _folder_bytes(path) for path in jobs}
        count, total = len(jobs), sum(sizes.values())
        for path in jobs:
            over_count = count + 1 > self.keep_jobs
            over_size = self.max_bytes is not None and total + needed > self.max_bytes
            if not (over_count or over_size or self._disk_room() < needed):
                break
            if path.name in self._in_use:
                continue
            shutil.rmtree(path, ignore_errors=True)
            self._used.pop(path.name, None)
            count, total = count - 1, total - sizes[path]
        return total

    def _check_room(self, total: int, needed: int) -> None:
        if self.max_bytes is not None and total + needed > self.max_bytes:
            raise WorkDirFull(
                f"the agent's work folder is at its --max-work-mb of {self.max_bytes / MIB:g} "
                f"MiB with jobs in use ({total / MIB:.1f} MiB); an upload of "
                f"{needed / MIB:.1f} MiB does not fit; retry when they finish"
            )
        if self._disk_room() < needed:
            raise WorkDirFull(disk_full_message(self.work_dir))
