"""The physical latency floor: no honest run can beat the ops / peak or the bytes / bandwidth.

A measurement faster than the floor means something skipped the work (a cached result, a lazy
runtime, a broken timer), so it must never become a reward. The floor is deliberately generous:
it is divided by a safety factor, so the check only ever rejects measurements that are broken,
never ones that are merely fast.

The two sides of the bound live apart: what the graph must do in `graph_cost`, what this
machine can do in `peaks`; this module combines them and judges a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.errors import MeasurementError
from pipeline.core.profile import TargetProfile
from pipeline.measure.runners.base import LatencyStats
from pipeline.measure.runners.graph_cost import onnx_cost
from pipeline.measure.runners.peaks import (
    cpu_flags,
    last_level_cache_bytes,
    measure_bandwidth_gbs,
    measure_peak_gflops,
)

# FP32 runs at most at the measured FP32 matmul peak; a factor 2 absorbs a peak measured on a
# busy machine and kernels that need fewer multiplies than the direct convolution (Winograd).
FP32_SAFETY = 2.0
# INT8 with AVX-512 VNNI does 4x the FP32 multiply-adds per instruction (and FP16 at most as
# much), so low-precision graphs may run up to 4x the FP32 peak.
LOW_PRECISION_SAFETY = 4.0
# AMX tiles do ~32x the FP32 AVX-512 multiply-adds per cycle on INT8 (1024 vs 32 per core).
AMX_INT8_SAFETY = 32.0


def low_precision_safety() -> float:
    """How many times the FP32 peak INT8 / FP16 kernels may reach on this CPU."""
    return AMX_INT8_SAFETY if "amx_int8" in cpu_flags() else LOW_PRECISION_SAFETY


def latency_floor_ms(
    cost: Mapping[str, Any],
    peaks_gflops: float,
    bandwidth_gbs: float,
    *,
    cache_bytes: int | None = None,
    low_precision_factor: float | None = None,
) -> dict[str, float]:
    """The fastest one inference of the costed graph could possibly run.

    `compute_ms` is 2 * MACs at the FP32 peak. `memory_ms` is the weight bytes that cannot stay
    in the last-level cache between runs, at the DRAM bandwidth (activations are left out:
    fused kernels keep them on chip). `floor_ms = max(compute_ms, memory_ms) / safety_factor`,
    with the factor 2 for FP32 graphs and 4 (32 on AMX CPUs) for graphs holding INT8 or FP16,
    which may run several times the FP32 peak. The factors are generous on purpose: the floor
    must never reject an honest measurement.

    Args:
        cost: From `onnx_cost`.
        peaks_gflops: FP32 peak throughput in GFLOP/s.
        bandwidth_gbs: Memory bandwidth in GB/s.
        cache_bytes: Last-level cache size (detected when None).
        low_precision_factor: Safety factor for INT8 / FP16 graphs (detected when None).

    Returns:
        `compute_ms`, `memory_ms` (before the safety factor), `safety_factor`, `floor_ms`.
    """
    if peaks_gflops <= 0 or bandwidth_gbs <= 0:
        raise ValueError("peak throughput and bandwidth must be positive")
    cache = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    compute_ms = 2.0 * cost["macs"] / (peaks_gflops * 1e9) * 1e3
    memory_ms = max(0, cost["weight_bytes"] - cache) / (bandwidth_gbs * 1e9) * 1e3
    low = cost.get("int8", False) or cost.get("fp16", False)
    if low:
        factor = low_precision_safety() if low_precision_factor is None else low_precision_factor
    else:
        factor = FP32_SAFETY
    return {
        "compute_ms": compute_ms,
        "memory_ms": memory_ms,
        "safety_factor": float(factor),
        "floor_ms": max(compute_ms, memory_ms) / factor,
    }


def physical_floor(profile: TargetProfile, onnx_path: Path) -> dict[str, Any] | None:
    """The floor of `onnx_path` on the profile's target, or None when it cannot be known.

    The profile's `peaks.gflops` / `peaks.bandwidth_gbs` override the measured ones. Peaks are
    measured on this machine's CPU, so for other runtimes (a GPU) without peaks in the
    profile there is no floor: a CPU peak would reject honest GPU measurements.

    Returns:
        `latency_floor_ms`'s keys plus `macs`, `peak_gflops` and `bandwidth_gbs`, or None.
    """
    peaks = profile.peaks
    measured_here = profile.runtime == "onnxruntime-cpu" and profile.device == "local"
    if not measured_here and (peaks.gflops is None or peaks.bandwidth_gbs is None):
        return None
    cost = onnx_cost(onnx_path, (profile.input.batch, *profile.input.shape))
    gflops = peaks.gflops or measure_peak_gflops(profile.threads)
    bandwidth = peaks.bandwidth_gbs or measure_bandwidth_gbs(profile.threads)
    floor = latency_floor_ms(cost, gflops, bandwidth)
    return {**floor, "macs": cost["macs"], "peak_gflops": gflops, "bandwidth_gbs": bandwidth}


def check_floor(stats: LatencyStats, floor: Mapping[str, Any] | float) -> None:
    """Reject a measurement faster than physics allows.

    Args:
        stats: The measurement.
        floor: `latency_floor_ms` / `physical_floor` output, or the floor in milliseconds.

    Raises:
        MeasurementError: Even one timed run (`stats.min_ms`) beat the floor.
    """
    floor_ms = float(floor["floor_ms"] if isinstance(floor, Mapping) else floor)
    if stats.min_ms < floor_ms:
        raise MeasurementError(
            f"measured median {stats.median_ms:.4g} ms (fastest run {stats.min_ms:.4g} ms) is "
            f"below the physical floor {floor_ms:.4g} ms: the measurement is broken (a skipped "
            "or cached run, or a timer error); re-measure, or set the profile's peaks if the "
            "measured machine peaks are too low"
        )
