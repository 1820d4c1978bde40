"""The runner of profiles whose `device:` is an agent: measure and infer on the target over HTTP.

The device does the work: it builds the engine when its runtime needs one, times the runs itself
(the HTTP round trip is never in the samples) and sends back the statistics. The registry gives
this runner to every profile with a remote device, whatever its `runtime:`, which the agent runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.core.errors import MeasurementError, ModelError, RuntimeNotAvailable
from pipeline.core.profile import RemoteDevice, TargetProfile
from pipeline.measure.runners.base import LatencyStats, Runner


def check_remote(profile: TargetProfile) -> None:
    """Fail fast, before any work: the token is set, the agent answers and has the runtime.

    Raises:
        ConfigError: The token's environment variable is unset, or the agent refuses it.
        RuntimeNotAvailable: The agent is unreachable or cannot run the profile's runtime.
    """
    from pipeline.measure.device_client import device_info, device_token

    device = _remote(profile)
    device_token(device)
    try:
        runtimes = device_info(profile).get("runtimes")
    except MeasurementError as exc:
        raise RuntimeNotAvailable(f"profile '{profile.name}': {exc}") from None
    runtimes = runtimes if isinstance(runtimes, dict) else {}
    reason = runtimes.get(profile.runtime, "the agent does not know this runtime")
    if reason is not None:
        raise RuntimeNotAvailable(
            f"the device agent at {device.url} cannot run runtime '{profile.runtime}' "
            f"(profile '{profile.name}'): {reason}"
        )


def _remote(profile: TargetProfile) -> RemoteDevice:
    if not isinstance(profile.device, RemoteDevice):
        raise ValueError(f"profile '{profile.name}' runs locally, not on a device agent")
    return profile.device


class RemoteRunner(Runner):
    """Sends the artifact to the profile's device agent; `measure` and `infer` run there.

    `last_result` holds the agent's record of the latest measurement: the artifact's and the
    engine's sha256, and the device's health before and after.
    """

    runtime: ClassVar[str] = "remote"
    suffixes = (".onnx",)

    def __init__(self, artifact: Path, profile: TargetProfile) -> None:
        if Path(artifact).suffix == ".engine":
            raise ModelError(
                f"{artifact}: a device agent builds its own engine on the device from the .onnx "
                "graph (engines are never sent to it); give the .onnx"
            )
        super().__init__(artifact, profile)
        self.device = _remote(profile)
        self.last_result: dict[str, Any] | None = None
        self._client: Any = None
        self._job_id: str | None = None

    @property
    def name(self) -> str:
        return f"RemoteRunner({self.device.url}, {self.profile.runtime})"

    def _activate_impl(self) -> None:
        from pipeline.measure.device_client import DeviceClient

        self._client = DeviceClient(self.device)  # reads the token: fails here, not mid-run
        self._job_id = None

    def measure(self, warmup: int | None = None, repeats: int | None = None) -> LatencyStats:
        """Time the profile's input on the device: `warmup` untimed runs, then `repeats` timed.

        The device times each run itself, as a local runner does; the statistics come back.

        Raises:
            RuntimeError: The runner is not active.
            ValueError: `repeats` below 30 or `warmup` below 1.
            MeasurementError: The device is unreachable, timed out or failed the measurement.
        """
        self._require_active("measure")
        warmup, repeats = self._measure_settings(warmup, repeats)
        spec = self.profile.measure.model_copy(update={"warmup": warmup, "repeats": repeats})
        profile = self.profile.model_copy(update={"measure": spec})
        record = self._client.measure(self.artifact, profile)
        self.last_result = record
        self._job_id = record.get("job_id")
        try:
            return LatencyStats.from_dict(record["stats"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MeasurementError(
                f"device agent at {self.device.url} sent incomplete statistics: {exc}"
            ) from None

    def _infer_impl(self, feed: np.ndarray) -> np.ndarray:
        from pipeline.measure.device_client import JobGone

        if self._job_id is None:
            self._job_id = self._client.upload(self.artifact, self.profile)
        try:
            return self._client.infer(self._job_id, feed)
        except JobGone:  # the agent restarted since the upload: send the model again, once
            self._job_id = self._client.upload(self.artifact, self.profile)
            return self._client.infer(self._job_id, feed)

    def _deactivate_impl(self) -> None:
        self._client.close()
        self._client = None
