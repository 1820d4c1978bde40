"""Latency measurement backends behind one interface, picked by the profile's `runtime:`.

Runner modules (`ort_cpu`, `ort_cuda`, `ort_trt`, `trt`, and `remote` for a device agent) are
imported on first use by the registry, so importing this package never needs CUDA, TensorRT or
a device.
"""

from pipeline.measure.runners.base import LatencyStats, Runner, profile_input
from pipeline.measure.runners.registry import (
    available_runtimes,
    check_runtime,
    get_runner,
    register_runner,
    runner_class,
)

__all__ = [
    "LatencyStats",
    "Runner",
    "available_runtimes",
    "check_runtime",
    "get_runner",
    "profile_input",
    "register_runner",
    "runner_class",
]
