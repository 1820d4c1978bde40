"""The `trtexec` command lines that build and time an engine the way `build_engine` does.

A user on a Jetson can then build the engine without this tool, compare it with ours, or
rebuild it after a JetPack upgrade. The flags mirror the builder's settings: a strongly typed
network (the graph's types decide each layer's precision), TF32 off, the same workspace limit,
the same timing cache, and the optimisation profile of the target's batch.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import onnx

from exporters.tensorrt_meta import ShapeRange, profile_shapes
from pipeline.core.profile import TargetProfile

WORKSPACE_MIB = 1024  # build_engine's default workspace, 1 GiB


def input_range(onnx_path: Path, profile: TargetProfile) -> tuple[str, ShapeRange]:
    """The graph's image input and its optimisation profile for `profile` (as the builder's)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    tensor = next(i for i in graph.input if i.name not in initializers)
    dims = [d.dim_value or None for d in tensor.type.tensor_type.shape.dim]
    return tensor.name, profile_shapes(tensor.name, dims, profile.input.shape, profile.input.batch)


def trtexec_commands(
    onnx_path: Path,
    profile: TargetProfile,
    engine: str = "model.engine",
    timing_cache: str | None = "timing.cache",
    workspace_mib: int = WORKSPACE_MIB,
) -> dict[str, str]:
    """`build`: the engine from the graph; `bench`: its latency at the profile's batch, at
    least the profile's repeats (trtexec's warm-up is a time, left at its default). Files are
    named as in the graph's folder, where the commands are meant to run."""
    name, ranges = input_range(onnx_path, profile)

    def spec(shape: tuple[int, ...]) -> str:
        return f"{name}:{'x'.join(str(d) for d in shape)}"

    build = [
        "trtexec",
        f"--onnx={onnx_path.name}",
        f"--saveEngine={engine}",
        "--stronglyTyped",
        "--noTF32",
        f"--memPoolSize=workspace:{workspace_mib}",
    ]
    if ranges.min != ranges.max:  # a dynamic batch: the same profile as the builder's
        build += [f"--minShapes={spec(ranges.min)}", f"--optShapes={spec(ranges.opt)}"]
        build += [f"--maxShapes={spec(ranges.max)}"]
    if timing_cache is not None:
        build.append(f"--timingCacheFile={timing_cache}")
    measure = profile.measure
    bench = [
        "trtexec",
        f"--loadEngine={engine}",
        f"--shapes={spec(ranges.opt)}",
        f"--iterations={measure.repeats}",
        "--noDataTransfers",
        "--useSpinWait",
    ]
    return {"build": shlex.join(build), "bench": shlex.join(bench)}
