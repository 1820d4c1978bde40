"""The steps of a TensorRT engine build, on Polygraphy, NVIDIA's own tooling.

Polygraphy (`polygraphy.backend.trt`, tested against each TensorRT release) creates the strongly
typed network, the builder config (workspace limit, optimisation profile, timing cache loaded and
saved under a file lock, TF32 off) and builds the serialised engine. What stays ours: filling the
network from the graph (Polygraphy's ONNX loaders log the parser's errors and raise only "Could
not parse ONNX correctly", where we name the unsupported nodes in one line), the optimisation
profile's shapes (the target profile's input and batch) and the settings as plain data, which the
engine's metadata records and the unit tests check without TensorRT.

`tensorrt` and `polygraphy` are imported inside the functions, so importing this module needs
neither TensorRT nor CUDA; `exporters.tensorrt.build_engine` runs the steps in order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporters.tensorrt_meta import (
    ParserIssue,
    ShapeRange,
    parser_failure_message,
    profile_shapes,
    squash,
)
from pipeline.core.errors import ModelError
from pipeline.core.profile import TargetProfile

if TYPE_CHECKING:
    import tensorrt as trt

TIMING_CACHE_NAME = "timing.cache"

Network = tuple["trt.Builder", "trt.INetworkDefinition", "trt.OnnxParser"]


@dataclass(frozen=True)
class BuildSettings:
    """How an engine is built, as plain data: Polygraphy's config arguments and the metadata."""

    input_name: str
    ranges: ShapeRange
    workspace_bytes: int
    timing_cache: Path | None
    timing_cache_reused: bool

    def config_kwargs(self, workspace_pool: Any) -> dict[str, Any]:
        """The arguments of Polygraphy's `CreateConfig` (`workspace_pool`: the memory pool
        type of the workspace, `trt.MemoryPoolType.WORKSPACE` in a build)."""
        from polygraphy.backend.trt import Profile

        r = self.ranges
        reuse = self.timing_cache is not None and self.timing_cache_reused
        return {
            # An FP32 tensor in the graph means FP32 arithmetic, not TF32's 10-bit mantissa.
            "tf32": False,
            "memory_pool_limits": {workspace_pool: self.workspace_bytes},
            "profiles": [Profile().add(self.input_name, r.min, r.opt, r.max)],
            # Polygraphy warns about a cache path that does not exist yet: give it none.
            "load_timing_cache": str(self.timing_cache) if reuse else None,
        }

    def metadata(self, build_s: float) -> dict[str, Any]:
        """The `builder` record of the engine's metadata."""
        return {
            "workspace_bytes": self.workspace_bytes,
            "strongly_typed": True,
            "tf32": False,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            "timing_cache_reused": self.timing_cache_reused,
            "build_s": round(build_s, 3),
        }


def build_settings(
    input_name: str, ranges: ShapeRange, workspace_bytes: int, timing_cache: Path | None
) -> BuildSettings:
    """The settings of one build; a saved, non-empty timing cache is reused."""
    reused = timing_cache is not None and timing_cache.is_file() and timing_cache.stat().st_size
    return BuildSettings(input_name, ranges, int(workspace_bytes), timing_cache, bool(reused))


def timing_cache_file(out_path: Path, timing_cache: Path | bool) -> Path | None:
    """The timing cache of `build_engine`'s `timing_cache` argument, or None for none."""
    if timing_cache is True:
        return out_path.parent / TIMING_CACHE_NAME
    return Path(timing_cache) if timing_cache else None


def _onnx_nodes(onnx_path: Path) -> list[tuple[str, str, str]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [(n.name, n.op_type, n.domain) for n in model.graph.node]


def _issue(error: trt.ParserError, nodes: Sequence[tuple[str, str, str]]) -> ParserIssue:
    """A parser error as plain data; names and ops come from the graph when TRT omits them."""
    index = int(error.node())
    name, op, domain = error.node_name(), error.node_operator(), ""
    if 0 <= index < len(nodes):
        name, op, domain = name or nodes[index][0], op or nodes[index][1], nodes[index][2]
    code = error.code()
    return ParserIssue(index, name, op, domain, getattr(code, "name", str(code)), error.desc())


def parse_network(onnx_path: Path) -> Network:
    """A strongly typed network filled from the graph, or refused listing the nodes TensorRT
    cannot take. The parser owns the parsed weights: keep it alive until the engine is built."""
    import tensorrt as trt
    from polygraphy.backend.trt import create_network, get_trt_logger

    # TensorRT 10 (JetPack 6) needs the flag for the graph's types to be the network's;
    # TensorRT 11 networks are always strongly typed, and should a release drop the deprecated
    # flag, none is asked for.
    typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    builder, network = create_network(strongly_typed=typed)
    parser = trt.OnnxParser(network, get_trt_logger())
    if parser.parse_from_file(str(onnx_path)):
        return builder, network, parser
    nodes = _onnx_nodes(onnx_path)
    issues = [_issue(parser.get_error(i), nodes) for i in range(parser.num_errors)]
    raise ModelError(parser_failure_message(onnx_path, issues))


def network_io(
    network: trt.INetworkDefinition, profile: TargetProfile, onnx_path: Path
) -> tuple[str, ShapeRange, dict[str, Any], dict[str, Any]]:
    """The input's name and optimisation-profile shapes; inputs and outputs for the metadata."""
    if network.num_inputs != 1:
        names = ", ".join(network.get_input(i).name for i in range(network.num_inputs))
        raise ModelError(
            f"{onnx_path}: expected one image input, the graph has {network.num_inputs}: {names}"
        )
    tensor = network.get_input(0)
    try:
        ranges = profile_shapes(
            tensor.name, _dims(tensor.shape), profile.input.shape, profile.input.batch
        )
    except ModelError as exc:
        raise ModelError(f"{onnx_path}: {exc}") from None
    inputs = {tensor.name: {**ranges.to_dict(), "dtype": tensor.dtype.name}}
    outputs = {}
    for i in range(network.num_outputs):
        out = network.get_output(i)
        outputs[out.name] = {"shape": _dims(out.shape), "dtype": out.dtype.name}
    return tensor.name, ranges, inputs, outputs


def _dims(dims: trt.Dims) -> list[int]:
    # Dims iterates through the old __getitem__ protocol only, which static typing does not take.
    return [dims[i] for i in range(len(dims))]


def serialize_engine(
    network: Network, settings: BuildSettings, onnx_path: Path
) -> tuple[bytes, float]:
    """The built engine's bytes and the seconds the build took; this build's timings are
    added to the timing cache (Polygraphy merges them with any saved there meanwhile)."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network
    from polygraphy.exception import PolygraphyException

    config = CreateConfig(**settings.config_kwargs(trt.MemoryPoolType.WORKSPACE))
    cache = settings.timing_cache
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        plan: trt.IHostMemory = engine_bytes_from_network(
            network, config=config, save_timing_cache=str(cache) if cache else None
        )
    except PolygraphyException as exc:
        raise ModelError(
            f"{onnx_path}: TensorRT could not build an engine ({squash(str(exc))}; TensorRT's "
            "errors are logged above)"
        ) from None
    return memoryview(plan).tobytes(), time.perf_counter() - start
