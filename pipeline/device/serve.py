"""`pipeline device serve`: check the options, then run the agent's app on uvicorn.

uvicorn runs with the guarded h11 protocol of `pipeline.device.guard` (header and body
deadlines, connection caps) and these settings of its own: `timeout_keep_alive` (idle kept-alive
connections), `h11_max_incomplete_event_size` (largest request head), `limit_concurrency`
(requests in progress, counting those whose client left: 503 beyond), `backlog` (connections
not yet accepted), `timeout_graceful_shutdown` (how long Ctrl-C waits for requests in flight)
and no WebSocket support (the agent has none).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.device.guard import ConnectionLimits, guarded_protocol
from pipeline.device.server import AgentSettings, create_app

log = logging.getLogger(__name__)
MIN_TOKEN_CHARS = 16
MIB = 2**20
# Ctrl-C waits this long for requests in flight, then cancels them (a job may run for minutes).
GRACEFUL_SHUTDOWN_S = 10


@dataclass(frozen=True)
class ServeOptions:
    """The limits `pipeline device serve` takes from its options."""

    max_upload_mb: float = 1024
    job_timeout_s: float = 600
    work_dir: Path | None = None
    max_work_mb: float = 8192
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)

    def check(self) -> None:
        """Raises ConfigError naming the first option out of range."""
        if self.max_upload_mb <= 0 or self.job_timeout_s <= 0:
            raise ConfigError("--max-upload-mb and --job-timeout-s must be positive")
        if self.max_work_mb < self.max_upload_mb:
            raise ConfigError(
                f"--max-work-mb ({self.max_work_mb:g}) must be at least --max-upload-mb "
                f"({self.max_upload_mb:g}): the largest upload must fit in the work folder"
            )
        self.limits.check()


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
    options: ServeOptions | None = None,
) -> None:
    """Run the agent until interrupted.

    Raises:
        ConfigError: No usable token, half a TLS pair, a missing TLS file, or bad limits.
    """
    import uvicorn

    options = options or ServeOptions()
    token = read_token(token_file)
    _check_tls(tls_cert, tls_key)
    options.check()
    if tls_cert is None and not is_loopback(host):
        _warn(
            f"serving on {host} without TLS: the token and models cross the network in the "
            "clear; pass --tls-cert and --tls-key"
        )
    settings = AgentSettings(
        token=token,
        work_dir=Path(options.work_dir) if options.work_dir else default_work_dir(),
        max_upload_bytes=int(options.max_upload_mb * MIB),
        job_timeout_s=options.job_timeout_s,
        max_work_bytes=int(options.max_work_mb * MIB),
    )
    scheme = "https" if tls_cert else "http"
    _warn(f"device agent on {scheme}://{host}:{port} (jobs in {settings.work_dir})", "")
    limits = options.limits
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_level="warning",
        http=guarded_protocol(limits, token),
        ws="none",
        lifespan="on",
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        limit_concurrency=2 * limits.max_connections,
        # Connections waiting to be accepted; asyncio also accepts this many in one go, before
        # the gate sees any, so it bounds the descriptors a burst of connections can take.
        backlog=2 * limits.max_connections,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def _check_tls(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key (or neither)")
    for path in (cert, key):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS file not found: {path}")


def _warn(message: str, prefix: str = "warning: ") -> None:
    print(f"{prefix}{message}", file=sys.stderr, flush=True)
