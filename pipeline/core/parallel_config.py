"""`search.parallel`: where a search's candidates are evaluated (strict, typed).

Kept free of Ray: a run config naming the `ray` backend is checked when it is read, so a
machine without Ray fails with one line before any work, like any other config error.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.errors import ConfigError
from pipeline.core.schema import StrictModel

RAY_MISSING = (
    "backend 'ray' needs Ray, which is not installed here: pip install '.[ray]' "
    "(or pip install 'ray>=2.9'), or set search.parallel.backend: local"
)


def require_ray() -> ModuleType:
    """The `ray` module.

    Raises:
        ConfigError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(f"search.parallel: {RAY_MISSING}") from None
    return ray


class ParallelConfig(StrictModel):
    """How many candidates are in flight at once, and where they run.

    `workers` shapes the search itself (agents propose that many candidates at a time), so a
    `local` backend with the same `workers` evaluates the same candidates one after another:
    results then match a `ray` run with the same seed (see the README's "Scale out").
    """

    backend: Literal["local", "ray"] = "local"
    address: str | None = Field(
        None,
        description="a Ray cluster to join: `auto` (the one `ray start --head` started on this "
        "machine), HOST:6379 or ray://HOST:10001; none starts a local Ray for the run",
    )
    workers: int = Field(1, ge=1, le=1024, description="candidates evaluated at once")
    cpus_per_worker: float = Field(
        1.0, gt=0, le=1024, description="CPUs (and torch threads) each Ray worker's fine-tunes use"
    )

    @model_validator(mode="after")
    def _backend_is_usable(self) -> ParallelConfig:
        if self.address is not None and self.backend != "ray":
            raise ValueError("address is only used with backend: ray; set backend: ray or drop it")
        if self.backend == "ray":
            try:
                require_ray()
            except ConfigError:
                raise ValueError(RAY_MISSING) from None
        return self
