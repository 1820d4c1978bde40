"""Pick the runner for a profile by the name in its `runtime:` key.

Runner modules are imported only when a profile asks for their runtime, so importing
`pipeline.measure.runners` never needs onnxruntime-gpu, TensorRT, CUDA or a device.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pipeline.core.errors import RuntimeNotAvailable
from pipeline.core.profile import TargetProfile
from pipeline.measure.runners.base import Runner

R = TypeVar("R", bound=type[Runner])

# Runners registered so far (filled by @register_runner when their module is imported).
_RUNNERS: dict[str, type[Runner]] = {}

# Where the runner of each runtime lives, imported on first use.
_MODULES: dict[str, str] = {
    "onnxruntime-cpu": "pipeline.measure.runners.ort_cpu",
    "onnxruntime-cuda": "pipeline.measure.runners.ort_cuda",
    "onnxruntime-trt": "pipeline.measure.runners.ort_trt",
    "tensorrt": "pipeline.measure.runners.trt",
}

# What a runtime needs, told to the user when its runner cannot be imported.
_NEEDS: dict[str, str] = {
    "onnxruntime-cpu": "onnxruntime (pip install onnxruntime)",
    "onnxruntime-cuda": "an NVIDIA GPU with onnxruntime-gpu (pip install .[gpu])",
    "onnxruntime-trt": "an NVIDIA GPU with onnxruntime-gpu and TensorRT (pip install .[gpu])",
    "tensorrt": "an NVIDIA GPU with TensorRT (pip install .[gpu])",
}

_FALLBACK = "use a profile with runtime onnxruntime-cpu, e.g. profiles/cpu.yaml"


def register_runner(runtime: str) -> Callable[[R], R]:
    """Class decorator: make `cls` the runner of profiles whose `runtime:` is `runtime`.

    Args:
        runtime: The runtime name as written in profiles (e.g. `onnxruntime-cpu`).

    Raises:
        ValueError: Another class is already registered under that name.
    """

    def decorate(cls: R) -> R:
        existing = _RUNNERS.get(runtime)
        # Same qualified name: the module was re-imported (e.g. reloaded), not a clash.
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"runtime '{runtime}' already has runner {existing.__qualname__}")
        cls.runtime = runtime
        _RUNNERS[runtime] = cls
        return cls

    return decorate


def available_runtimes() -> list[str]:
    """Every runtime name a profile may give (whether or not it runs on this machine)."""
    return sorted(set(_MODULES) | set(_RUNNERS))


def runner_class(runtime: str, profile_name: str = "?") -> type[Runner]:
    """The runner class for `runtime`, importing its module on first use.

    Raises:
        RuntimeNotAvailable: The runtime is unknown or its runner cannot run on this machine.
    """
    if runtime not in _RUNNERS and runtime in _MODULES:
        try:
            importlib.import_module(_MODULES[runtime])
        except ImportError as exc:
            raise _not_available(runtime, profile_name, _needs(runtime)) from exc
    cls = _RUNNERS.get(runtime)
    if cls is None:
        known = ", ".join(available_runtimes())
        raise RuntimeNotAvailable(
            f"unknown runtime '{runtime}' (profile '{profile_name}'); use one of: {known}"
        )
    reason = cls.unavailable_reason()
    if reason is not None:
        raise _not_available(runtime, profile_name, reason)
    return cls


def check_runtime(profile: TargetProfile) -> type[Runner]:
    """Fail fast, before any work, when the profile's target cannot be used from here.

    Args:
        profile: Its `runtime` must be runnable on this machine, or on its device agent.

    Returns:
        The runner class `get_runner` will use (`RemoteRunner` for a device agent).

    Raises:
        RuntimeNotAvailable: A runtime this machine (or the device agent) cannot run, or an
            agent that cannot be reached.
        ConfigError: The agent's token is not set, or it is refused.
    """
    if profile.device != "local":
        return _remote_runner(profile)
    return runner_class(profile.runtime, profile.name)


def _remote_runner(profile: TargetProfile) -> type[Runner]:
    """The runner of profiles whose device is an agent: the agent runs the runtime there."""
    from pipeline.measure.runners.remote import RemoteRunner, check_remote

    check_remote(profile)
    return RemoteRunner


def get_runner(profile: TargetProfile, artifact: Path) -> Runner:
    """The runner for `profile.runtime`, constructed (not yet activated) for `artifact`.

    Args:
        profile: Its `runtime` picks the runner; a remote `device` gets the RemoteRunner.
        artifact: The .onnx (or .engine) file to run.

    Returns:
        An inactive runner; use it as a context manager.

    Raises:
        RuntimeNotAvailable, ConfigError: As `check_runtime`.
        ModelError: The artifact is missing or of a kind the runtime cannot run.
    """
    return check_runtime(profile)(Path(artifact), profile)


def _needs(runtime: str) -> str:
    return f"its runner needs {_NEEDS.get(runtime, 'dependencies missing here')}"


def _not_available(runtime: str, profile_name: str, reason: str) -> RuntimeNotAvailable:
    hint = "" if runtime == "onnxruntime-cpu" else f"; {_FALLBACK}"
    return RuntimeNotAvailable(
        f"runtime '{runtime}' (profile '{profile_name}') is not available on this machine: "
        f"{reason}{hint}",
        reason=reason,
    )
