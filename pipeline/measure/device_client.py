"""The host's side of the device agent: HTTP calls with the token, retries and clear errors.

A connection that fails (refused, reset, dropped mid-job) is retried with exponential backoff,
`device.retries` times; a device that stays down is a MeasurementError naming its URL. What the
agent refuses is mapped back to the error the user can act on (a wrong token is a ConfigError,
an oversized model a ModelError, a full disk on the device a DeviceFull, an error raised on the
device keeps its type).
"""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from pipeline.core import errors
from pipeline.core.artifacts import sha256_file
from pipeline.core.errors import ConfigError, MeasurementError, ModelError
from pipeline.core.profile import RemoteDevice, TargetProfile
from pipeline.measure.device_protocol import (
    PROFILE_HEADER,
    SHA256_HEADER,
    array_to_npy,
    encode_profile,
    is_job_id,
    npy_to_array,
)

CA_ENV = "PIPELINE_DEVICE_CA"
BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
CONNECT_TIMEOUT_S = 10.0
# Failures of the connection itself: the agent is down, restarting, or dropped us mid-job.
_RETRIED = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
_INFO: dict[tuple[str, str], dict[str, Any]] = {}


class JobGone(MeasurementError):
    """The agent no longer has the job (it restarted with a new work dir, or pruned it)."""


class DeviceFull(MeasurementError):
    """The agent has no room for the job (HTTP 507): its disk, or its work folder, is full.

    Nothing to retry at once: the agent takes the next job by itself once space is free.
    """


def device_token(device: RemoteDevice) -> str:
    """The agent's token from the environment variable the profile names.

    Raises:
        ConfigError: The variable is unset or empty.
    """
    token = os.environ.get(device.token_env, "").strip()
    if not token:
        raise ConfigError(
            f"the device agent at {device.url} needs its token in ${device.token_env}; "
            f"export {device.token_env}=<the token file's contents on the device>"
        )
    return token


def _verify() -> ssl.SSLContext | bool:
    """Trust the system CAs, or only the certificate in $PIPELINE_DEVICE_CA (self-signed)."""
    ca = os.environ.get(CA_ENV)
    if not ca:
        return True
    if not Path(ca).is_file():
        raise ConfigError(f"${CA_ENV} names {ca}, which is not a file; give the agent's cert")
    return ssl.create_default_context(cafile=ca)


class DeviceClient:
    """Calls to one agent; use as a context manager or call `close()`."""

    def __init__(self, device: RemoteDevice) -> None:
        self.device = device
        self.url = device.url.rstrip("/")
        if not self.url.startswith(("https://", "http://")):
            raise ConfigError(
                f"device.url {device.url!r} needs a scheme: https://HOST:PORT (http:// only on "
                "a network you trust)"
            )
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {device_token(device)}"},
            timeout=httpx.Timeout(
                device.timeout_s, connect=min(device.timeout_s, CONNECT_TIMEOUT_S)
            ),
            verify=_verify(),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ endpoints

    def health(self) -> dict[str, Any]:
        return self._json(self.request("GET", "/health"))

    def info(self) -> dict[str, Any]:
        """What the device is and which runtimes it has (GET /info)."""
        return self._json(self.request("GET", "/info"))

    def measure(self, artifact: Path, profile: TargetProfile) -> dict[str, Any]:
        """Upload `artifact` and measure it on the device with the profile's settings.

        Returns:
            The agent's record: `job_id`, `sha256`, `engine_sha256`, `stats` (LatencyStats
            fields plus `floor_ms`), `health` {before, after}, `started`, `finished`.

        Raises:
            MeasurementError: Unreachable device, timeout, or a failed measurement.
            ConfigError, ModelError, RuntimeNotAvailable: What the agent refused, and why.
        """
        record = self._json(self._upload("/measure", artifact, profile), artifact)
        self._check_sha(artifact, record.get("sha256"))
        return record

    def upload(self, artifact: Path, profile: TargetProfile) -> str:
        """Store `artifact` on the device for later inference; its job id."""
        record = self._json(self._upload("/models", artifact, profile), artifact)
        self._check_sha(artifact, record.get("sha256"))
        return str(record["job_id"])

    def infer(self, job_id: str, feed: np.ndarray) -> np.ndarray:
        """The first output of the job's model for `feed`, computed on the device."""
        response = self.request("POST", f"/infer/{_job(job_id)}", content=array_to_npy(feed))
        self._raise_for(response)
        try:
            return npy_to_array(response.content)
        except ValueError as exc:
            raise MeasurementError(f"device agent at {self.url} sent a bad array: {exc}") from None

    def download(self, job_id: str, dest: Path) -> Path:
        """Save the job's built engine (else its model) as `dest`, checking its hash."""
        response = self.request("GET", f"/artifacts/{_job(job_id)}")
        self._raise_for(response)
        dest = Path(dest)
        dest.write_bytes(response.content)
        expected = response.headers.get(SHA256_HEADER)
        if expected and sha256_file(dest) != expected:
            dest.unlink()
            raise MeasurementError(f"{dest}: download from {self.url} is corrupt (hash mismatch)")
        return dest

    # ------------------------------------------------------------------ transport

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP call, retried on connection failures with exponential backoff.

        Raises:
            MeasurementError: Still failing after `device.retries` retries, or no answer
                within `device.timeout_s`.
        """
        attempts = self.device.retries + 1
        last: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                response = self._http.request(method, path, **kwargs)
            except _RETRIED as exc:
                last = exc
                continue
            except httpx.TimeoutException:
                raise MeasurementError(
                    f"device agent at {self.url} gave no answer to {method} {path} within "
                    f"{self.device.timeout_s:g} s; raise device.timeout_s in the profile"
                ) from None
            except httpx.HTTPError as exc:
                raise MeasurementError(f"device agent at {self.url}: {exc}") from None
            if response.status_code == 503 and attempt + 1 < attempts:
                continue
            return response
        reason = f"{type(last).__name__}: {last}" if last else "HTTP 503"
        raise MeasurementError(
            f"device agent at {self.url} is unreachable after {attempts} attempt(s) ({reason}); "
            "check that `pipeline device serve` runs there and the profile's device.url"
        )

    def _upload(self, path: str, artifact: Path, profile: TargetProfile) -> httpx.Response:
        headers = {
            PROFILE_HEADER: encode_profile(profile),
            "Content-Type": "application/octet-stream",
        }
        return self.request("POST", path, content=Path(artifact).read_bytes(), headers=headers)

    def _json(self, response: httpx.Response, artifact: Path | None = None) -> dict[str, Any]:
        self._raise_for(response, artifact)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise MeasurementError(f"device agent at {self.url} sent a malformed answer")
        return data

    def _raise_for(self, response: httpx.Response, artifact: Path | None = None) -> None:
        """Turn an error answer into the error the user can act on."""
        code = response.status_code
        if code < 400:
            return
        body = _body(response)
        detail = str(body.get("error") or body.get("detail") or response.reason_phrase)
        where = f"device agent at {self.url}"
        if code == 401:
            raise ConfigError(
                f"{where} refused the token in ${self.device.token_env} (401); set it to the "
                "contents of the agent's token file"
            )
        if code == 413:
            raise ModelError(f"{artifact or 'the upload'}: {where} refused it: {detail}")
        if code == 404:
            raise JobGone(f"{where}: {detail} (the agent restarted or pruned the job)")
        if code == 504:
            raise MeasurementError(f"{where}: {detail}")
        if code == 507:
            raise DeviceFull(f"{where} has no room for the job (507): {detail}")
        kind = _error_class(body.get("error_type"))
        if kind is not None:
            raise kind(f"{where}: {detail}")
        if code == 422 and "error_type" not in body:
            raise ConfigError(f"{where} refused the request: {detail}")
        raise MeasurementError(f"{where}: HTTP {code}: {body.get('error_type', '')} {detail}")

    def _check_sha(self, artifact: Path, remote: str | None) -> None:
        if remote != sha256_file(Path(artifact)):
            raise MeasurementError(
                f"{artifact}: the device agent at {self.url} stored a different file "
                "(hash mismatch); retry the upload"
            )


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _error_class(name: object) -> type[Exception] | None:
    """The pipeline error named by the agent (only our own error types, nothing else)."""
    cls = getattr(errors, str(name), None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, (errors.PipelineError, MeasurementError)):
        return cls
    return None


def _job(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


def device_info(profile: TargetProfile) -> dict[str, Any]:
    """The agent's GET /info for a profile with a remote device, asked once per process.

    Raises:
        ValueError: The profile's device is local.
        ConfigError: The token is missing or refused.
        MeasurementError: The agent is unreachable.
    """
    device = profile.device
    if not isinstance(device, RemoteDevice):
        raise ValueError(f"profile '{profile.name}' runs locally, not on a device agent")
    key = (device.url, device_token(device))  # another token may see another agent's answer
    if key not in _INFO:
        with DeviceClient(device) as client:
            _INFO[key] = client.info()
    return _INFO[key]


def remember_device_info(profile: TargetProfile, info: dict[str, Any]) -> None:
    """Give this process the agent's GET /info answer another process already has.

    Search workers key candidates by the device's identity; a worker restarted while the agent
    is unreachable must still key them as the search began, not fail.
    """
    device = profile.device
    if isinstance(device, RemoteDevice):
        _INFO[(device.url, device_token(device))] = info


def device_identity(profile: TargetProfile) -> dict[str, Any]:
    """What the agent says it is: board, GPU, power mode and runtime versions ({} if local).

    Part of the latency cache key, so a measurement is reused only on the same kind of device
    with the same runtimes and power mode.

    Raises:
        ConfigError, MeasurementError: As `device_info`.
    """
    if not isinstance(profile.device, RemoteDevice):
        return {}
    info = device_info(profile)
    return {
        "device": info.get("device"),
        "gpu": info.get("gpu"),
        "power_mode": (info.get("jetson") or {}).get("power_mode"),
        "versions": info.get("versions"),
    }
