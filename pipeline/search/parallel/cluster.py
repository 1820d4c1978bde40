"""Joining (or starting) the Ray cluster, and what every actor of a search is given."""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.core.errors import first_line as one_line
from pipeline.core.parallel_config import ParallelConfig, require_ray
from pipeline.core.profile import TargetProfile

# Besides the device tokens, what a worker on another process or node needs from this
# environment: the cache of measured peaks and weights, and the agents' TLS certificate.
FORWARDED_ENV = ("PIPELINE_CACHE", "PIPELINE_DEVICE_CA")
CONNECT_TIMEOUT_S = 5.0


def connect(config: ParallelConfig) -> bool:
    """Join the cluster at `config.address`, or start a local one; True when this call
    started or joined it (and the caller shuts it down), False when Ray was already running.

    Raises:
        ConfigError: Ray is missing, or no cluster answers at the address.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    down = _unreachable(config.address) if config.address else None
    if down is not None:
        raise ConfigError(
            f"search.parallel.address {config.address!r}: nothing answers there ({down}); start "
            "a cluster with `ray start --head`, or leave address unset to start a local one"
        )
    try:
        if config.address:
            ray.init(address=config.address, logging_level=logging.WARNING)
        else:  # room for every worker even on a small machine: they mostly wait on devices
            cpus = max(math.ceil(config.workers * config.cpus_per_worker), os.cpu_count() or 1)
            ray.init(
                address="local",  # a new one, even where `ray start` left a cluster running
                num_cpus=cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = one_line(exc)
        raise ConfigError(
            f"search.parallel.address {config.address!r}: no Ray cluster answers ({reason}); "
            "start one with `ray start --head`, or leave address unset to start a local one"
        ) from None
    return True


def _unreachable(address: str) -> str | None:
    """Why nothing listens at a HOST:PORT address, at once (Ray itself keeps trying for
    minutes); None when something does, or for `auto`, which Ray resolves itself."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def forwarded_env(profile: TargetProfile) -> dict[str, str]:
    """Environment variables the search's actors need: device tokens (read from the names the
    profile gives, never written in it) and FORWARDED_ENV. A cluster started elsewhere does not
    have this process's environment, so it travels with each actor's runtime environment."""
    names = {device.token_env for device in profile.fleet} | set(FORWARDED_ENV)
    return {name: os.environ[name] for name in sorted(names) if os.environ.get(name)}


def gpus_per_worker(workers: int) -> float:
    """Each worker's share of the cluster's GPUs (`gpu_share`)."""
    ray = require_ray()
    return gpu_share(float(ray.cluster_resources().get("GPU", 0.0)), workers)


def gpu_share(gpus: float, workers: int) -> float:
    """GPUs a worker's fine-tunes request: at most one each, none on a cluster without GPUs;
    with fewer GPUs than workers, Ray shares each GPU between workers."""
    if gpus <= 0:
        return 0.0
    return math.floor(100 * min(1.0, gpus / workers)) / 100


def worker_options(config: ParallelConfig, env: dict[str, str]) -> dict[str, Any]:
    """Ray options of a search worker. The evaluator, not Ray, replaces a dead worker and
    retries its candidate (on whichever worker is free first), so it can count the retry."""
    return {
        "num_cpus": config.cpus_per_worker,
        "num_gpus": gpus_per_worker(config.workers),
        "max_restarts": 0,
        "max_task_retries": 0,
        "runtime_env": {"env_vars": env},
    }


def on_this_node() -> Any:
    """A scheduling strategy that keeps an actor on this process's node (a `local` device is
    the machine the run was started on)."""
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def first_line(exc: BaseException) -> str:
    """An error's first line; Ray wraps task errors, so their cause speaks instead."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    return one_line(exc)
