"""The device agent's HTTP service (FastAPI on uvicorn): `pipeline device serve` on the target.

Endpoints: `GET /health` (open), and behind a bearer token: `GET /info`, `POST /measure`
(model bytes in, latency stats out), `POST /models` (upload only), `POST /infer/{job_id}`
(.npy in, .npy out), `GET /artifacts/{job_id}` (the built engine, else the model).

Safe by default: the token is checked on every request but /health with a constant-time
comparison; uploads are capped (declared and actual size) and the numbers of a profile bounded;
the server names every file itself, inside a folder named by a random job id; jobs run one at a
time in a child process that is killed when it overruns; a full disk answers 507. Connection
limits and read deadlines live below the app, in `pipeline.device.guard`; `pipeline.device.serve`
starts the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.core.artifacts import sha256_file
from pipeline.core.errors import ConfigError
from pipeline.device import probe
from pipeline.device.bounds import check_profile_bounds, check_profile_header_size
from pipeline.device.guard import bearer_matches
from pipeline.device.jobs import PROFILE_FILE, JobFailed, JobRunner, JobTimeout
from pipeline.device.workdir import WorkDirFull, disk_full_message, is_disk_full
from pipeline.measure.device_protocol import (
    PROFILE_HEADER,
    SHA256_HEADER,
    array_to_npy,
    decode_profile,
    npy_to_array,
)

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health"})
_STATUS_CODES = {"ok": 200, "timeout": 504, "error": 422}
_DISK_FULL_TEXT = "No space left on device"  # how a job process reports ENOSPC (strerror)


@dataclass(frozen=True)
class AgentSettings:
    """How one agent runs: its token, where jobs go, and their limits."""

    token: str
    work_dir: Path
    max_upload_bytes: int
    job_timeout_s: float
    keep_jobs: int = 100
    max_work_bytes: int | None = None


class BearerAuth:
    """ASGI middleware: every HTTP request but OPEN_PATHS needs `Authorization: Bearer TOKEN`.

    It runs before routing, so unknown paths are refused too and nothing leaks without the token.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] not in OPEN_PATHS
            and not bearer_matches(scope["headers"], self._token)
        ):
            response = JSONResponse(
                {"detail": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(settings: AgentSettings) -> FastAPI:
    """The agent's ASGI app; its job process starts with the app (lifespan) and stops with it."""
    jobs = JobRunner(
        settings.work_dir, settings.job_timeout_s, settings.keep_jobs, settings.max_work_bytes
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(jobs.start)
        yield
        await run_in_threadpool(jobs.close)

    # No /docs or /openapi.json: the agent serves measurements, not a browsable API.
    app = FastAPI(
        title="pipeline device agent",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.add_middleware(BearerAuth, token=settings.token)
    app.add_exception_handler(WorkDirFull, _work_dir_full)
    app.state.jobs = jobs
    _routes(app, jobs, settings)
    return app


def _routes(app: FastAPI, jobs: JobRunner, settings: AgentSettings) -> None:
    limit = settings.max_upload_bytes
    folders = jobs.folders

    @app.get("/health")
    async def health() -> dict[str, Any]:  # async: answers even when every worker thread waits
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        agent = {
            "max_upload_bytes": limit,
            "job_timeout_s": settings.job_timeout_s,
            "max_work_bytes": settings.max_work_bytes,
        }
        return {**probe.system_info(), **jobs.worker.ready_info, "agent": agent}

    @app.post("/models")
    async def upload(request: Request) -> dict[str, Any]:
        job = await _accept_model(request, jobs, limit)
        folders.release(job.job_id)
        return {"job_id": job.job_id, "sha256": job.sha256}

    @app.post("/measure")
    async def measure(request: Request) -> JSONResponse:
        job = await _accept_model(request, jobs, limit)
        try:
            record = await run_in_threadpool(jobs.measure, job.job_id, job.job_dir, job.profile)
        finally:
            folders.release(job.job_id)
        return JSONResponse(record, status_code=_measure_status(record))

    _job_routes(app, jobs, limit)


def _job_routes(app: FastAPI, jobs: JobRunner, limit: int) -> None:
    """Routes on a job uploaded before: inference and its artifact."""
    folders = jobs.folders

    @app.post("/infer/{job_id}")
    async def infer(job_id: str, request: Request) -> Response:
        _existing_job(jobs, job_id)
        feed = _parse_feed(await _read_limited(request, limit))
        with folders.using(job_id) as job_dir:
            if job_dir is None:  # pruned while the feed arrived
                raise HTTPException(404, "no such job")
            try:
                out = await run_in_threadpool(jobs.infer, job_id, job_dir, feed)
            except JobTimeout as exc:
                return JSONResponse({"status": "timeout", "error": str(exc)}, status_code=504)
            except JobFailed as exc:
                body = {"status": "error", "error_type": exc.error_type, "error": str(exc)}
                return JSONResponse(body, status_code=422)
        return Response(array_to_npy(out), media_type="application/octet-stream")

    @app.get("/artifacts/{job_id}")
    def artifact(job_id: str) -> FileResponse:
        with folders.using(job_id) as job_dir:  # the latest used: the last to be pruned
            if job_dir is None:
                raise HTTPException(404, "no such job")
            path = jobs.artifact_path(job_dir)
            if not path.is_file():
                raise HTTPException(404, "the job has no artifact")
            digest = sha256_file(path)
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=f"{job_id}{path.suffix}",
            headers={SHA256_HEADER: digest},
        )


def _measure_status(record: dict[str, Any]) -> int:
    """HTTP status of a measurement's record: a job that ran out of disk is a 507 too."""
    if record.get("status") == "error" and _DISK_FULL_TEXT in str(record.get("error", "")):
        return 507
    return _STATUS_CODES.get(record["status"], 500)


async def _work_dir_full(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=507)


# --------------------------------------------------------------------------- uploads


@dataclass(frozen=True)
class Upload:
    """An uploaded graph, stored as `<work dir>/<job_id>/model.onnx`; the job is in use until
    the caller releases it."""

    job_id: str
    job_dir: Path
    profile: dict[str, Any]
    sha256: str


def _read_profile(request: Request) -> dict[str, Any]:
    """The profile header, decoded and within the agent's bounds (422 otherwise)."""
    text = request.headers.get(PROFILE_HEADER, "")
    try:
        check_profile_header_size(text)
        profile = decode_profile(text)
        check_profile_bounds(profile)
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    return profile


async def _accept_model(request: Request, jobs: JobRunner, limit: int) -> Upload:
    """Check the headers, then stream the body to `<job dir>/model.<kind>`.

    Only the profile and the bytes come from the client; every name comes from the server,
    so no header or field can steer a path.

    Raises:
        HTTPException: Bad headers (422, 400), too large (413).
        WorkDirFull: No room for the upload, even after pruning old jobs (507).
    """
    profile = _read_profile(request)
    declared = _check_declared_size(request, limit)
    folders = jobs.folders
    # Off the event loop: pruning removes folders, which may hold large engines.
    job_id, job_dir = await run_in_threadpool(folders.new_job, declared or 0)
    try:
        room = await run_in_threadpool(folders.room)
        digest = await _stream_to(request, jobs.model_path(job_dir), limit, room)
        (job_dir / PROFILE_FILE).write_text(json.dumps(profile))
    except BaseException as exc:
        folders.discard(job_id)
        if is_disk_full(exc):
            raise WorkDirFull(disk_full_message(folders.work_dir)) from None
        raise
    return Upload(job_id, job_dir, profile, digest)


def _check_declared_size(request: Request, limit: int) -> int | None:
    """The declared Content-Length (None without one); 413 above `limit`."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise HTTPException(400, "Content-Length is not a number")
    if int(declared) > limit:
        raise HTTPException(413, _too_large(limit))
    return int(declared)


async def _stream_to(request: Request, path: Path, limit: int, room: int) -> str:
    """Write the body to a new file, 413 once more than `limit` bytes arrive, WorkDirFull once
    more than `room`; its sha256."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "xb") as fh:  # "x": a job folder is fresh, nothing is ever overwritten
        async for chunk in _limited_chunks(request, limit):
            size += len(chunk)
            if size > room:
                raise WorkDirFull(
                    f"the upload outgrew the {room / 2**20:.1f} MiB left for the agent's jobs "
                    f"(free disk and --max-work-mb) in {path.parent.parent}; free space there"
                )
            digest.update(chunk)
            fh.write(chunk)
    return digest.hexdigest()


async def _read_limited(request: Request, limit: int) -> bytes:
    _check_declared_size(request, limit)
    return b"".join([chunk async for chunk in _limited_chunks(request, limit)])


async def _limited_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, counted as they arrive (Content-Length may be absent or lie).

    Past the limit, up to `limit` more bytes are read and dropped before the 413, so a client
    still sending hears the answer instead of a reset connection.
    """
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > 2 * limit:
                break
            if size <= limit:
                yield chunk
    except ClientDisconnect:
        raise HTTPException(400, "the client went away during the upload") from None
    if size > limit:
        raise HTTPException(413, _too_large(limit))


def _too_large(limit: int) -> str:
    return f"upload larger than the agent's limit of {limit / 2**20:g} MiB (--max-upload-mb)"


def _existing_job(jobs: JobRunner, job_id: str) -> Path:
    job_dir = jobs.folders.job_dir(job_id)
    if job_dir is None:
        raise HTTPException(404, "no such job")
    return job_dir


def _parse_feed(data: bytes) -> np.ndarray:
    try:
        feed = npy_to_array(data)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    if feed.dtype != np.float32 or feed.ndim != 4:
        raise HTTPException(
            422, f"the feed must be float32 (B, C, H, W), got {feed.dtype} of shape {feed.shape}"
        )
    return feed
