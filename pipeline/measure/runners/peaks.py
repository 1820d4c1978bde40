"""This machine's peaks: the FP32 matmul throughput, the memory bandwidth and the cache size.

They bound how fast any honest run can be, so every estimate here errs high (the best of many
short runs, one thread's peak scaled linearly): a peak measured too low would make the
physical floor (`pipeline.measure.runners.floor`) reject honest measurements. Measured peaks
are cached per host under `$PIPELINE_CACHE`, so each machine measures once.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import write_json

CACHE_ENV = "PIPELINE_CACHE"
# When the last-level cache size is unknown, assume a large one: it only lowers the floor.
DEFAULT_CACHE_BYTES = 64 << 20


def cache_path() -> Path:
    """The JSON file caching this machine's measured peaks (`$PIPELINE_CACHE/peaks.json`)."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "pipeline"
    return base / "peaks.json"


def measure_peak_gflops(
    threads: int, sizes: Sequence[int] = (256, 512), repeats: int = 30
) -> float:
    """Upper bound of the FP32 throughput of `threads` CPU threads, in GFLOP/s (cached).

    One thread's peak is the best of `repeats` timed square matmuls of each size (torch's
    sgemm), and `threads` threads are credited `threads` times that. Timing one thread and
    scaling is deliberate: a multi-threaded matmul timed while other processes share the cores
    reads several times too low (seen here: 34 vs 430 GFLOP/s on 2 threads), and a low peak
    cached once would make the floor reject honest measurements forever. Linear scaling
    bounds the real multi-thread peak from above (shared cores, lower all-core clocks), so the
    floor errs low. Short runs and the best of many dodge preemption by other processes.

    Args:
        threads: Threads the runtime will use (the profile's `threads`).
        sizes: Matrix sizes to try; the fastest throughput counts.
        repeats: Timed matmuls per size.

    Returns:
        GFLOP/s, from the cache when this machine measured one thread before.
    """
    key = "gflops_fp32_1thread"
    per_thread = _cached(key, lambda: max(_time_matmul(1, n, repeats) for n in sizes))
    return threads * per_thread


def measure_bandwidth_gbs(threads: int = 1, size_mb: int = 256, repeats: int = 5) -> float:
    """Upper bound of the memory bandwidth `threads` threads can pull, in GB/s (cached).

    One thread's bandwidth is the best of `repeats` copies of a `size_mb` numpy buffer,
    counted as three passes over it (read, the write-allocate read, write) so it errs high;
    `threads` threads are credited `threads` times that, which bounds the real, saturating
    aggregate from above. Both keep the memory floor low: it must never reject honest runs.

    Args:
        threads: Threads the runtime will use (the profile's `threads`).
        size_mb: Buffer size; large so the copy streams from DRAM.
        repeats: Timed copies; the fastest counts.

    Returns:
        GB/s, from the cache when this machine measured one thread before.
    """
    key = f"bandwidth_gbs_1thread_{size_mb}mb"
    return threads * _cached(key, lambda: _time_copy(size_mb, repeats))


def _time_matmul(threads: int, size: int, repeats: int) -> float:
    import torch  # heavy; only needed when the peak is not cached

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        out = torch.empty(size, size)
        best = _best_time(lambda: torch.mm(a, b, out=out), repeats)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * size**3 / best / 1e9


def _time_copy(size_mb: int, repeats: int) -> float:
    src = np.ones(size_mb << 18, dtype=np.float32)  # size_mb MiB of float32
    dst = np.empty_like(src)
    best = _best_time(lambda: np.copyto(dst, src), repeats)
    return 3.0 * src.nbytes / best / 1e9


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults and thread start-up are not throughput
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - start) * 1e-9)
    return max(best, 1e-9)


def _cached(key: str, measure: Callable[[], float]) -> float:
    path = cache_path()
    data = _read_cache(path)
    host = platform.node() or "localhost"  # a shared home directory serves several machines
    value = data.get(host, {}).get(key)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    value = float(measure())
    data.setdefault(host, {})[key] = value
    write_json(path, data)
    return value


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt cache: measure again
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs), or a generous 64 MiB when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            sizes.append(_parse_size(f.read_text().strip()))
        except (OSError, ValueError):
            continue
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), empty when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
