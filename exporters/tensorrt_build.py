"""The steps of a TensorRT engine build: the network filled from the graph, the builder's
settings, the input's optimisation profile, the timing cache and the serialised plan.

Each step is handed the `tensorrt` module or its objects, so importing this module needs
neither TensorRT nor CUDA; `exporters.tensorrt.build_engine` runs them in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from exporters.tensorrt_meta import ParserIssue, parser_failure_message, profile_shapes
from pipeline.core.artifacts import atomic_write_bytes
from pipeline.core.errors import ModelError
from pipeline.core.profile import TargetProfile

logger = logging.getLogger(__name__)

TIMING_CACHE_NAME = "timing.cache"


def _onnx_nodes(onnx_path: Path) -> list[tuple[str, str, str]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [(n.name, n.op_type, n.domain) for n in model.graph.node]


def _issue(error: Any, nodes: Sequence[tuple[str, str, str]]) -> ParserIssue:
    """A parser error as plain data; names and ops come from the graph when TRT omits them."""
    index = int(error.node())
    name = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    domain = ""
    if 0 <= index < len(nodes):
        name, op, domain = name or nodes[index][0], op or nodes[index][1], nodes[index][2]
    code = error.code()
    return ParserIssue(index, name, op, domain, getattr(code, "name", str(code)), error.desc())


def parse_network(parser: Any, data: bytes, onnx_path: Path) -> None:
    """Fill the network from the graph, or refuse it listing the nodes TensorRT cannot take."""
    if parser.parse(data, str(onnx_path)):
        return
    nodes = _onnx_nodes(onnx_path)
    issues = [_issue(parser.get_error(i), nodes) for i in range(parser.num_errors)]
    raise ModelError(parser_failure_message(onnx_path, issues))


def builder_config(trt: ModuleType, builder: Any, workspace_bytes: int) -> tuple[Any, dict]:
    """The builder's configuration (workspace limit, no TF32), and its settings as plain data."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if hasattr(trt.BuilderFlag, "TF32"):
        # An FP32 tensor in the graph means FP32 arithmetic, not TF32's 10-bit mantissa.
        config.clear_flag(trt.BuilderFlag.TF32)
    settings = {
        "workspace_bytes": int(workspace_bytes),
        "strongly_typed": True,
        "tf32": False,
        "builder_optimization_level": getattr(config, "builder_optimization_level", None),
    }
    return config, settings


def add_input_profile(
    builder: Any, config: Any, network: Any, profile: TargetProfile, onnx_path: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Add the input's optimisation profile; return the inputs and outputs for the metadata."""
    if network.num_inputs != 1:
        names = ", ".join(network.get_input(i).name for i in range(network.num_inputs))
        raise ModelError(
            f"{onnx_path}: expected one image input, the graph has {network.num_inputs}: {names}"
        )
    tensor = network.get_input(0)
    try:
        ranges = profile_shapes(
            tensor.name, tuple(tensor.shape), profile.input.shape, profile.input.batch
        )
    except ModelError as exc:
        raise ModelError(f"{onnx_path}: {exc}") from None
    opt = builder.create_optimization_profile()
    opt.set_shape(tensor.name, ranges.min, ranges.opt, ranges.max)
    config.add_optimization_profile(opt)
    inputs = {tensor.name: {**ranges.to_dict(), "dtype": _enum_name(tensor.dtype)}}
    outputs = {}
    for i in range(network.num_outputs):
        out = network.get_output(i)
        outputs[out.name] = {"shape": list(out.shape), "dtype": _enum_name(out.dtype)}
    return inputs, outputs


def _enum_name(value: Any) -> str:
    return str(getattr(value, "name", value))


def timing_cache_file(out_path: Path, timing_cache: Path | bool) -> Path | None:
    """The timing cache of `build_engine`'s `timing_cache` argument, or None for none."""
    if timing_cache is True:
        return out_path.parent / TIMING_CACHE_NAME
    return Path(timing_cache) if timing_cache else None


def use_timing_cache(config: Any, path: Path | None) -> bool:
    """Give the builder the saved timing cache; True when a saved one was accepted."""
    if path is None:
        return False
    saved = path.read_bytes() if path.is_file() else b""
    # A cache from another device or version is refused (not ignored): tactics timed elsewhere
    # would mislead the builder. An empty cache then collects this build's timings.
    loaded = config.create_timing_cache(saved) if saved else None
    if loaded is not None and config.set_timing_cache(loaded, False):
        return True
    if saved:
        logger.warning("timing cache %s is unusable on this device; starting a new one", path)
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def save_timing_cache(config: Any, path: Path) -> None:
    """Save this build's timings to `path`, along with any saved there since it was read."""
    cache = config.get_timing_cache()
    if path.is_file() and hasattr(cache, "combine"):
        # Another build may have saved timings meanwhile: keep theirs as well as ours.
        other = config.create_timing_cache(path.read_bytes())
        cache.combine(other, True)
    atomic_write_bytes(path, to_bytes(cache.serialize()))


def to_bytes(host_memory: Any) -> bytes:
    """The bytes of a TensorRT IHostMemory (it exposes the buffer protocol)."""
    return memoryview(host_memory).tobytes()


def serialize_engine(
    builder: Any, network: Any, config: Any, log: Any, onnx_path: Path
) -> tuple[bytes, float]:
    """The built engine's bytes, and the seconds the build took."""
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - start
    if plan is None:
        raise ModelError(f"{onnx_path}: TensorRT could not build an engine: {log.last_error()}")
    return to_bytes(plan), build_s
