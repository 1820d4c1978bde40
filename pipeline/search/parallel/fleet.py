"""Measurements across a fleet of devices: one Ray actor per device, a pool that hands out work.

A `DeviceActor` runs one call at a time, so two measurements never overlap on its device; it
measures in a `MeasureWorker` child (with the search's timeout) exactly as a local search does.
The `DevicePool` gives each measurement to a free device. A measurement that fails while the
device no longer answers its health check takes the device out of rotation, and the pool
retries it on another; a measurement that fails on a healthy device is the candidate's failure.
Identical devices are required (same board, power mode and runtimes): they share one cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, MeasurementError, RuntimeNotAvailable
from pipeline.core.parallel_config import require_ray
from pipeline.core.profile import RemoteDevice, TargetProfile
from pipeline.measure.measure_worker import MeasureWorker
from pipeline.search.parallel.cluster import first_line, forwarded_env, on_this_node

log = logging.getLogger(__name__)
LOCAL = "local"
HEALTH_TIMEOUT_S = 10.0


class DeviceDown(MeasurementError):
    """The device stopped answering: not the candidate's fault; measure elsewhere."""


def device_name(profile: TargetProfile) -> str:
    device = profile.device
    return device.url if isinstance(device, RemoteDevice) else LOCAL


class DeviceActor:
    """One device; as a Ray actor it runs one `measure` at a time (max_concurrency 1)."""

    def __init__(self, profile_data: dict[str, Any], timeout_s: float) -> None:
        self.profile = TargetProfile.model_validate(profile_data)
        self.name = device_name(self.profile)
        self.measurer = MeasureWorker(self.profile, timeout_s)
        self.measurer.start()  # now, while the search's workers start, not on the first job
        self.spans: list[tuple[float, float]] = []  # (start, end) of each measurement

    def ready(self) -> str:
        return self.name

    def measure(self, onnx: bytes) -> dict[str, Any]:
        """`bench_artifact`'s result for the graph `onnx`, measured on this device.

        Raises:
            DeviceDown: The measurement failed and the device no longer answers.
            MeasurementError: The measurement failed on a device that still answers.
        """
        started = time.time()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "candidate.onnx"
                path.write_bytes(onnx)
                return self._measure(path)
        finally:
            self.spans.append((started, time.time()))

    def _measure(self, path: Path) -> dict[str, Any]:
        try:
            return self.measurer.measure(path)
        except MeasurementError as exc:
            down = self._down_reason()
            if down is not None:
                raise DeviceDown(f"device agent at {self.name} is down: {down}") from None
            raise MeasurementError(first_line(exc)) from None

    def _down_reason(self) -> str | None:
        """Why the device is down, or None while it answers (this machine always does)."""
        from pipeline.measure.device_client import DeviceClient

        device = self.profile.device
        if not isinstance(device, RemoteDevice):
            return None
        # /health answers at once even while a job runs: a short timeout, one retry.
        quick = {"timeout_s": min(device.timeout_s, HEALTH_TIMEOUT_S), "retries": 1}
        try:
            with DeviceClient(device.model_copy(update=quick)) as client:
                client.health()
        except Exception as exc:  # any failure to answer means out of rotation
            return first_line(exc)
        return None

    def timeline(self) -> list[tuple[float, float]]:
        return list(self.spans)

    def close(self) -> None:
        self.measurer.close()


class DevicePool:
    """Hands each measurement to a free device (an async Ray actor: many callers wait at once,
    each device serves one). Devices that went down leave the rotation for good."""

    def __init__(self, devices: dict[str, Any]) -> None:
        self.devices = devices
        self.idle: asyncio.Queue[str | None] = asyncio.Queue()
        for name in devices:
            self.idle.put_nowait(name)
        self.out: dict[str, str] = {}  # device -> why it left the rotation
        self.jobs = dict.fromkeys(devices, 0)
        self.retried = 0

    async def measure(self, onnx: bytes) -> dict[str, Any]:
        """Measure on the first free device; retried on another when that one is down.

        Raises:
            MeasurementError: The candidate's measurement failed, or no device is left.
        """
        while True:
            name = await self.idle.get()
            if name is None:  # every device is out: tell the next caller too
                self.idle.put_nowait(None)
                reasons = "; ".join(self.out.values())
                raise MeasurementError(f"no device of the profile is left to measure on: {reasons}")
            lost = False
            try:
                result = await self.devices[name].measure.remote(onnx)
            except Exception as exc:
                if not _device_lost(exc):
                    raise MeasurementError(first_line(exc)) from None
                lost = True
                self._take_out(name, first_line(exc))
            finally:  # also when the call is cancelled: the device is free again
                if not lost:
                    self.idle.put_nowait(name)
            if not lost:
                self.jobs[name] += 1
                return result

    def _take_out(self, name: str, reason: str) -> None:
        self.out[name] = reason
        log.warning("%s is out of rotation (%s); measuring on the others", name, reason)
        if len(self.out) == len(self.devices):
            self.idle.put_nowait(None)
        else:
            self.retried += 1  # the measurement goes to another device

    async def status(self) -> dict[str, Any]:
        return {
            "devices": list(self.devices),
            "jobs": dict(self.jobs),
            "out_of_rotation": dict(self.out),
            "retried_measurements": self.retried,
        }


def _device_lost(exc: BaseException) -> bool:
    """A device that went down, or whose actor died (its node is gone)."""
    from ray.exceptions import RayActorError

    cause = getattr(exc, "cause", exc)
    return isinstance(exc, RayActorError) or isinstance(cause, DeviceDown)


class FleetMeasurer:
    """What a search worker measures with in place of its own `MeasureWorker`."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def measure(self, artifact: Path) -> dict[str, Any]:
        """`bench_artifact`'s result for `artifact`, measured on a free device of the fleet.

        Raises:
            MeasurementError: The measurement failed, or no device is left.
        """
        ray = require_ray()
        try:
            return ray.get(self.pool.measure.remote(Path(artifact).read_bytes()))
        except ray.exceptions.RayError as exc:
            raise MeasurementError(first_line(exc)) from None

    def close(self) -> None:
        """Nothing to stop: the devices belong to the search, not to one worker."""


class Fleet:
    """The driver's handle on the device actors and their pool."""

    def __init__(self, pool: Any, devices: dict[str, Any]) -> None:
        self.pool = pool
        self.devices = devices

    @classmethod
    def start(cls, profile: TargetProfile, timeout_s: float) -> Fleet:
        """One actor per device of the profile (`local`: this machine), and the pool.

        Raises:
            ConfigError: The devices are not identical, or a token is missing or refused.
            RuntimeNotAvailable: No device answers.
        """
        ray = require_ray()
        env = {"env_vars": forwarded_env(profile)}
        actor = ray.remote(DeviceActor)
        devices = {}
        for name, single in _members(profile):
            options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1, "runtime_env": env}
            if name == LOCAL:
                options["scheduling_strategy"] = on_this_node()
            data = single.model_dump(mode="json")
            devices[name] = actor.options(**options).remote(data, timeout_s)
        pool = ray.remote(DevicePool).options(num_cpus=0, runtime_env=env).remote(devices)
        fleet = cls(pool, devices)
        fleet.await_ready()
        return fleet

    def await_ready(self) -> None:
        """Wait until every device actor has its measuring process.

        Raises:
            RuntimeNotAvailable: A device actor could not start.
        """
        ray = require_ray()
        try:
            ray.get([actor.ready.remote() for actor in self.devices.values()], timeout=300)
        except ray.exceptions.RayError as exc:
            self.close()
            raise RuntimeNotAvailable(
                f"a device actor could not start: {first_line(exc)}"
            ) from None

    def status(self) -> dict[str, Any]:
        return require_ray().get(self.pool.status.remote())

    def timelines(self) -> dict[str, list[tuple[float, float]]]:
        """Each device's measurements as (start, end) times, in the order they ran."""
        ray = require_ray()
        return {name: ray.get(actor.timeline.remote()) for name, actor in self.devices.items()}

    def close(self) -> None:
        ray = require_ray()
        for actor in self.devices.values():
            # A device actor that died has no measuring child left to stop.
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(actor.close.remote(), timeout=30)
            ray.kill(actor)
        ray.kill(self.pool)


def _members(profile: TargetProfile) -> list[tuple[str, TargetProfile]]:
    """(name, single-device profile) of every device that answers; identical ones only."""
    from pipeline.measure.device_client import device_identity

    if not profile.fleet:
        return [(LOCAL, profile)]
    members: list[tuple[str, TargetProfile]] = []
    identities: dict[str, Any] = {}
    down: list[str] = []
    for device in profile.fleet:
        single = profile.model_copy(update={"device": device, "devices": []})
        try:
            identities[device.url] = device_identity(single)
        except MeasurementError as exc:
            log.warning("device agent at %s does not answer; measuring without it", device.url)
            down.append(f"{device.url}: {first_line(exc)}")
            continue
        members.append((device.url, single))
    _check_identical(profile, identities)
    if not members:
        reasons = "; ".join(down)
        raise RuntimeNotAvailable(f"no device of profile '{profile.name}' answers: {reasons}")
    return members


def _check_identical(profile: TargetProfile, identities: dict[str, Any]) -> None:
    """Devices share one measurement cache: they must be the same kind of device."""
    urls = list(identities)
    for url in urls[1:]:
        if identities[url] != identities[urls[0]]:
            raise ConfigError(
                f"profile '{profile.name}': the devices are not identical ({url} reports "
                f"{identities[url]}, {urls[0]} reports {identities[urls[0]]}); list only devices "
                "of one board, power mode and runtime versions"
            )
