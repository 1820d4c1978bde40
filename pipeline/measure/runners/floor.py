"""The physical latency floor: no honest run can beat the ops / peak or the bytes / bandwidth.

A measurement faster than the floor means something skipped the work (a cached result, a lazy
runtime, a broken timer), so it must never become a reward. The floor is deliberately generous:
it is divided by a safety factor, so the check only ever rejects measurements that are broken,
never ones that are merely fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, shape_inference

from pipeline.core.artifacts import write_json
from pipeline.core.errors import MeasurementError, ModelError
from pipeline.core.profile import TargetProfile
from pipeline.measure.runners.base import LatencyStats

CACHE_ENV = "PIPELINE_CACHE"

# FP32 runs at most at the measured FP32 matmul peak; a factor 2 absorbs a peak measured on a
# busy machine and kernels that need fewer multiplies than the direct convolution (Winograd).
FP32_SAFETY = 2.0
# INT8 with AVX-512 VNNI does 4x the FP32 multiply-adds per instruction (and FP16 at most as
# much), so low-precision graphs may run up to 4x the FP32 peak.
LOW_PRECISION_SAFETY = 4.0
# AMX tiles do ~32x the FP32 AVX-512 multiply-adds per cycle on INT8 (1024 vs 32 per core).
AMX_INT8_SAFETY = 32.0
# When the last-level cache size is unknown, assume a large one: it only lowers the floor.
DEFAULT_CACHE_BYTES = 64 << 20

_CONV_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_GEMM_B_INPUT = {"Gemm": 1, "QGemm": 3}
_MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul"}
_INT8_TYPES = {TensorProto.INT8, TensorProto.UINT8}
_FP16_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
_QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
}

Shape = tuple[int, ...]


# --------------------------------------------------------------------------- graph cost


def onnx_cost(path: Path, input_shape: Sequence[int]) -> dict[str, Any]:
    """Multiply-accumulates and bytes of an ONNX graph for one input shape.

    Conv-like ops count `out_elems * (Cin / groups) * kh * kw`; Gemm and MatMul count
    `M * N * K`; the quantized forms (QLinearConv, ConvInteger, QGemm, QLinearMatMul,
    MatMulInteger) count the same. Weights count at their stored type's size, and a float
    weight that only feeds a QuantizeLinear counts at 1 byte, since the runtime folds it to
    INT8 at load.

    Args:
        path: The .onnx file.
        input_shape: The full input shape including the batch, e.g. (1, 3, 32, 32).

    Returns:
        `macs`, `weight_bytes`, `activation_bytes` (the graph input plus every tensor computed
        from it), and the flags `int8` / `fp16` (the graph holds such tensors).

    Raises:
        ModelError: The file cannot be read as ONNX or has no input.
    """
    model = _load_with_input_shape(Path(path), tuple(int(d) for d in input_shape))
    graph = model.graph
    shapes, types = _value_types(graph)
    consts = _constant_names(graph)
    return {
        "macs": sum(_node_macs(node, shapes) for node in graph.node),
        "weight_bytes": _weight_bytes(graph),
        "activation_bytes": _activation_bytes(graph, shapes, types, consts),
        "int8": _has_int8(graph, types),
        "fp16": any(t in _FP16_TYPES for t in types.values()),
    }


def _load_with_input_shape(path: Path, input_shape: Shape) -> onnx.ModelProto:
    try:
        # Weights stored externally stay on disk: only their shapes and types are needed.
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise ModelError(f"{path}: cannot read it as an ONNX model ({exc})") from exc
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        raise ModelError(f"{path}: the ONNX graph has no input")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ModelError(
            f"{path}: input '{inputs[0].name}' has rank {len(dims)}, the profile gives "
            f"shape {input_shape}; fix the profile's input.shape"
        )
    for dim, size in zip(dims, input_shape, strict=True):
        dim.Clear()
        dim.dim_value = size
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{path}: ONNX shape inference failed: {exc}") from exc


def _value_types(graph: onnx.GraphProto) -> tuple[dict[str, Shape | None], dict[str, int]]:
    """Shape (None when not fully known) and element type of every named tensor."""
    shapes: dict[str, Shape | None] = {}
    types: dict[str, int] = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim)
        shapes[vi.name] = dims if all(d > 0 for d in dims) else None
        types[vi.name] = tt.elem_type
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape | None]) -> int:
    """Multiply-accumulates of one node; 0 when a shape is unknown (keeps the floor low)."""

    def shape(i: int, outputs: bool = False) -> Shape | None:
        names = node.output if outputs else node.input
        return shapes.get(names[i]) if i < len(names) and names[i] else None

    out = shape(0, outputs=True)
    if node.op_type in _CONV_WEIGHT_INPUT:
        w = shape(_CONV_WEIGHT_INPUT[node.op_type])
        # Weight is (Cout, Cin / groups, kh, kw): each output element costs prod(w[1:]).
        return math.prod(out) * math.prod(w[1:]) if out and w else 0
    if node.op_type == "ConvTranspose":
        x, w = shape(0), shape(1)  # w is (Cin, Cout / groups, kh, kw)
        return math.prod(x) * math.prod(w[1:]) if x and w else 0
    if node.op_type in _GEMM_B_INPUT:
        # From the inputs: shape inference does not know QGemm (com.microsoft) outputs.
        a, b = shape(0), shape(_GEMM_B_INPUT[node.op_type])
        if not (a and b and len(a) == 2 and len(b) == 2):
            return 0
        m = a[1] if _attr(node, "transA") else a[0]
        k_n = b[::-1] if _attr(node, "transB") else b
        return m * k_n[0] * k_n[1]
    if node.op_type in _MATMUL_OPS:
        a = shape(0)  # (..., M, K) @ (..., K, N): each output element costs K
        return math.prod(out) * a[-1] if out and a else 0
    return 0


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def _itemsize(elem_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def _weight_bytes(graph: onnx.GraphProto) -> int:
    """Bytes of the initializers: the parameters the runtime reads on every inference."""
    quantized = _quantize_inputs(graph)
    total = 0
    for init in graph.initializer:
        if init.data_type == TensorProto.INT64:
            continue  # shapes, axes and indices: graph metadata, not weights
        size = 1 if init.name in quantized else _itemsize(init.data_type)
        total += math.prod(init.dims) * size
    return total


def _quantize_inputs(graph: onnx.GraphProto) -> set[str]:
    """Tensors read only as the float input of a QuantizeLinear (folded to INT8 at load)."""
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    other_uses = {
        name
        for n in graph.node
        for i, name in enumerate(n.input)
        if not (n.op_type == "QuantizeLinear" and i == 0)
    }
    return quantized - other_uses


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from weights alone: the runtime folds them, they move no activations."""
    consts = {t.name for t in graph.initializer}
    for node in graph.node:  # ONNX nodes are topologically sorted
        if node.op_type == "Constant" or all(not i or i in consts for i in node.input):
            consts.update(node.output)
    return consts


def _activation_bytes(
    graph: onnx.GraphProto,
    shapes: Mapping[str, Shape | None],
    types: Mapping[str, int],
    consts: set[str],
) -> int:
    names: Iterable[str] = (
        *(i.name for i in graph.input if i.name not in consts),
        *(o for n in graph.node for o in n.output if o and o not in consts),
    )
    total = 0
    for name in names:
        shape = shapes.get(name)
        if shape and name in types and types[name] != TensorProto.UNDEFINED:
            total += math.prod(shape) * _itemsize(types[name])
    return total


def _has_int8(graph: onnx.GraphProto, types: Mapping[str, int]) -> bool:
    return any(n.op_type in _QUANT_OPS for n in graph.node) or any(
        t in _INT8_TYPES for t in types.values()
    )


# --------------------------------------------------------------------------- machine peaks


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
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def low_precision_safety() -> float:
    """How many times the FP32 peak INT8 / FP16 kernels may reach on this CPU."""
    return AMX_INT8_SAFETY if "amx_int8" in _cpu_flags() else LOW_PRECISION_SAFETY


# --------------------------------------------------------------------------- the floor


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
