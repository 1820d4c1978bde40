"""Scale out a search: candidates evaluated on a Ray cluster, measured across a fleet of devices.

`search.parallel` in the run config picks the backend. `local` (the default) evaluates in this
process, exactly as a search always did; `ray` runs each candidate's prune, fine-tune, export
and accuracy as a task on a Ray worker and every measurement through one actor per device
(`pipeline.search.parallel.fleet`). Ray is optional (`pip install .[ray]`) and only the `ray`
backend imports it.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.parallel_config import ParallelConfig, require_ray


def parallel_evaluator(evaluator: Any, config: ParallelConfig) -> Any:
    """The evaluator a search uses: `evaluator` itself for one local worker (no change at all),
    a batching proxy for several local workers, a `RayEvaluator` for the Ray backend.

    Raises:
        ConfigError: Ray is missing, or the cluster at `config.address` cannot be reached.
        RuntimeNotAvailable: The cluster cannot start the workers or reach any device.
    """
    if config.backend == "ray":
        from pipeline.search.parallel.evaluator import RayEvaluator

        return RayEvaluator(evaluator, config)
    if config.workers == 1:
        return evaluator
    from pipeline.search.parallel.proxy import LocalBatches

    return LocalBatches(evaluator, config.workers)


def describe(evaluator: Any) -> dict[str, Any]:
    """For report.json: the backend, workers, and (on Ray) retries and the devices' jobs."""
    describe_fn = getattr(evaluator, "describe", None)
    return describe_fn() if callable(describe_fn) else {"backend": "local", "workers": 1}


__all__ = ["ParallelConfig", "describe", "parallel_evaluator", "require_ray"]
