"""The device agent's HTTP service (FastAPI on uvicorn): `pipeline device serve` on the target.

Endpoints: `GET /health` (open), and behind a bearer token: `GET /info`, `POST /measure`
(model bytes in, latency stats out), `POST /models` (upload only), `POST /infer/{job_id}`
(.npy in, .npy out), `GET /artifacts/{job_id}` (the built engine, else the model).

Safe by default: the token is checked on every request but /health with a constant-time
comparison; uploads are capped (declared and actual size); the server names every file itself,
inside a folder named by a random job id; jobs run one at a time in a child process that is
killed when it overruns.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import stat
import sys
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
from pipeline.device.jobs import PROFILE_FILE, JobFailed, JobRunner, JobTimeout
from pipeline.measure.device_protocol import (
    PROFILE_HEADER,
    SHA256_HEADER,
    array_to_npy,
    decode_profile,
    npy_to_array,
)

log = logging.getLogger(__name__)
MIN_TOKEN_CHARS = 16
OPEN_PATHS = frozenset({"/health"})
_STATUS_CODES = {"ok": 200, "timeout": 504, "error": 422}


@dataclass(frozen=True)
class AgentSettings:
    """How one agent runs: its token, where jobs go, and their limits."""

    token: str
    work_dir: Path
    max_upload_bytes: int
    job_timeout_s: float
    keep_jobs: int = 100


class BearerAuth:
    """ASGI middleware: every HTTP request but OPEN_PATHS needs `Authorization: Bearer TOKEN`.

    It runs before routing, so unknown paths are refused too and nothing leaks without the token.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            # compare_digest takes time independent of where the strings differ
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self._token):
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
    jobs = JobRunner(settings.work_dir, settings.job_timeout_s, settings.keep_jobs)

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
    app.state.jobs = jobs
    _routes(app, jobs, settings)
    return app


def _routes(app: FastAPI, jobs: JobRunner, settings: AgentSettings) -> None:
    limit = settings.max_upload_bytes

    @app.get("/health")
    async def health() -> dict[str, Any]:  # async: answers even when every worker thread waits
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        agent = {"max_upload_bytes": limit, "job_timeout_s": settings.job_timeout_s}
        return {**probe.system_info(), **jobs.worker.ready_info, "agent": agent}

    @app.post("/models")
    async def upload(request: Request) -> dict[str, Any]:
        job = await _accept_model(request, jobs, limit)
        return {"job_id": job.job_id, "sha256": job.sha256}

    @app.post("/measure")
    async def measure(request: Request) -> JSONResponse:
        job = await _accept_model(request, jobs, limit)
        record = await run_in_threadpool(jobs.measure, job.job_id, job.job_dir, job.profile)
        return JSONResponse(record, status_code=_STATUS_CODES.get(record["status"], 500))

    @app.post("/infer/{job_id}")
    async def infer(job_id: str, request: Request) -> Response:
        job_dir = _existing_job(jobs, job_id)
        feed = _parse_feed(await _read_limited(request, limit))
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
        job_dir = _existing_job(jobs, job_id)
        path = jobs.artifact_path(job_dir)
        if not path.is_file():
            raise HTTPException(404, "the job has no artifact")
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=f"{job_id}{path.suffix}",
            headers={SHA256_HEADER: sha256_file(path)},
        )


# --------------------------------------------------------------------------- uploads


@dataclass(frozen=True)
class Upload:
    """An uploaded graph, stored as `<work dir>/<job_id>/model.onnx`."""

    job_id: str
    job_dir: Path
    profile: dict[str, Any]
    sha256: str


async def _accept_model(request: Request, jobs: JobRunner, limit: int) -> Upload:
    """Check the headers, then stream the body to `<job dir>/model.<kind>`.

    Only the profile and the bytes come from the client; every name comes from the server,
    so no header or field can steer a path.
    """
    try:
        profile = decode_profile(request.headers.get(PROFILE_HEADER, ""))
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    _check_declared_size(request, limit)
    job_id, job_dir = jobs.new_job()
    try:
        digest = await _stream_to(request, jobs.model_path(job_dir), limit)
        (job_dir / PROFILE_FILE).write_text(json.dumps(profile))
    except BaseException:
        jobs.discard(job_id)
        raise
    return Upload(job_id, job_dir, profile, digest)


def _check_declared_size(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise HTTPException(400, "Content-Length is not a number")
    if int(declared) > limit:
        raise HTTPException(413, _too_large(limit))


async def _stream_to(request: Request, path: Path, limit: int) -> str:
    """Write the body to a new file, 413 once more than `limit` bytes arrive; its sha256."""
    digest = hashlib.sha256()
    with open(path, "xb") as fh:  # "x": a job folder is fresh, nothing is ever overwritten
        async for chunk in _limited_chunks(request, limit):
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
    job_dir = jobs.job_dir(job_id)
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


# --------------------------------------------------------------------------- serve


def read_token(token_file: Path | None) -> str:
    """The bearer token from its file (first line, stripped).

    Raises:
        ConfigError: No file given, unreadable, empty, or a token too short to be safe.
    """
    make = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > token && chmod 600 token"
    if token_file is None:
        raise ConfigError(f"the agent needs a token: create one ({make}) and pass --token-file")
    try:
        text = Path(token_file).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from None
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"token file {token_file} holds no token of at least {MIN_TOKEN_CHARS} characters; "
            f"make a random one: {make}"
        )
    if Path(token_file).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by other users; chmod 600 it", token_file)
    return token


def default_work_dir() -> Path:
    """`$PIPELINE_CACHE/device-jobs`, or `~/.cache/pipeline/device-jobs`."""
    env = os.environ.get("PIPELINE_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "pipeline"
    return base / "device-jobs"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: str,
    port: int,
    token_file: Path | None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    max_upload_mb: float = 1024,
    job_timeout_s: float = 600,
    work_dir: Path | None = None,
) -> None:
    """Run the agent until interrupted.

    Raises:
        ConfigError: No usable token, half a TLS pair, a missing TLS file, or bad limits.
    """
    import uvicorn

    token = read_token(token_file)
    _check_tls(tls_cert, tls_key)
    if max_upload_mb <= 0 or job_timeout_s <= 0:
        raise ConfigError("--max-upload-mb and --job-timeout-s must be positive")
    if tls_cert is None and not is_loopback(host):
        _warn(
            f"serving on {host} without TLS: the token and models cross the network in the "
            "clear; pass --tls-cert and --tls-key"
        )
    settings = AgentSettings(
        token=token,
        work_dir=Path(work_dir) if work_dir else default_work_dir(),
        max_upload_bytes=int(max_upload_mb * 2**20),
        job_timeout_s=job_timeout_s,
    )
    scheme = "https" if tls_cert else "http"
    _warn(f"device agent on {scheme}://{host}:{port} (jobs in {settings.work_dir})", "")
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_level="warning",
    )


def _check_tls(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key (or neither)")
    for path in (cert, key):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS file not found: {path}")


def _warn(message: str, prefix: str = "warning: ") -> None:
    print(f"{prefix}{message}", file=sys.stderr, flush=True)
