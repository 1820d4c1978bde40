"""Build a TensorRT engine from an ONNX graph, and load it only where it was built.

The precisions live in the graph: Q/DQ nodes around INT8 layers, float16 tensors for FP16 layers.
The network is created strongly typed, so TensorRT computes each tensor in the type the graph
gives it; TF32 is switched off so an FP32 layer really computes in FP32. That is also the only
mode TensorRT 11 has (it removed the builder precision flags and the INT8 calibrator), while
TensorRT 10 (JetPack 6) needs the STRONGLY_TYPED flag: one build path serves both. Polygraphy
(NVIDIA's) builds and loads the engines (`exporters.tensorrt_build` says what stays ours).

An engine runs only on the GPU model and the TensorRT version that built it, so every engine is
written with `<name>.engine.json` beside it (device, compute capability, TensorRT version, input
shapes, hashes), and `load_engine` refuses an engine whose metadata does not match this machine.

`tensorrt` and `polygraphy` are imported inside the functions that need them: importing this
module needs neither TensorRT nor CUDA. The plain-data parts live in `exporters.tensorrt_meta`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporters.tensorrt_build import (
    TIMING_CACHE_NAME,
    build_settings,
    network_io,
    parse_network,
    serialize_engine,
    timing_cache_file,
)
from exporters.tensorrt_meta import (
    ShapeRange,
    check_engine_metadata,
    check_input_shape,
    default_cache_dir,
    engine_cache_name,
    engine_metadata,
    environment_dir_name,
    metadata_path,
    profile_shapes,
    read_engine_metadata,
    squash,
)
from exporters.trtexec import trtexec_commands
from pipeline.core.artifacts import atomic_write_bytes, sha256_file, write_json
from pipeline.core.errors import ModelError, RuntimeNotAvailable
from pipeline.core.files import ENGINE_MAX_BYTES, check_file
from pipeline.core.profile import TargetProfile

if TYPE_CHECKING:
    import tensorrt as trt

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
DEFAULT_WORKSPACE_BYTES = 1 << 30
INSTALL_HINT = "pip install .[gpu]"

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "LoadedEngine",
    "ShapeRange",
    "build_engine",
    "check_input_shape",
    "current_environment",
    "engine_for_onnx",
    "load_engine",
    "metadata_path",
    "profile_shapes",
    "require_tensorrt",
    "tensorrt_unavailable_reason",
]


# --------------------------------------------------------------------------- TensorRT


def require_tensorrt() -> str:
    """The version of the installed `tensorrt` module, 10 or newer.

    Raises:
        RuntimeNotAvailable: tensorrt is missing, cannot load its libraries, or is too old.
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeNotAvailable(f"tensorrt is not installed ({INSTALL_HINT})") from None
    except OSError as exc:  # the wheel is there but libnvinfer or CUDA libraries are not
        raise RuntimeNotAvailable(
            f"tensorrt cannot load its libraries ({squash(str(exc), 120)}); "
            f"reinstall it ({INSTALL_HINT})"
        ) from None
    # The type stubs (tensorrt-stubs) alone install a `tensorrt` folder that imports as an
    # empty namespace package, without a version.
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str):
        raise RuntimeNotAvailable(
            f"tensorrt is not installed, only its type stubs are ({INSTALL_HINT})"
        )
    if _major(version) < MIN_TENSORRT_MAJOR:
        raise RuntimeNotAvailable(
            f"tensorrt {version} is too old: {MIN_TENSORRT_MAJOR}.x or newer is needed "
            f"({INSTALL_HINT})"
        )
    _quiet_polygraphy()
    return version


def _major(version: str) -> int:
    head = str(version).split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _quiet_polygraphy() -> None:
    """Polygraphy prints each build's configuration, progress and TensorRT's warnings: keep only
    the errors (TensorRT's come through it), unless this run logs at debug level. No colours:
    they need a package Polygraphy asks for in a line of its own."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False
    if not logger.isEnabledFor(logging.DEBUG):
        G_LOGGER.module_severity = G_LOGGER.ERROR


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot be used here (not installed, too old), or None when it can."""
    try:
        require_tensorrt()
    except RuntimeNotAvailable as exc:
        return str(exc)
    return None


def current_environment() -> dict[str, Any]:
    """{"tensorrt_version", "device"} of this machine, as engine metadata records them.

    Raises:
        RuntimeNotAvailable: No TensorRT or no CUDA device here.
    """
    from pipeline.core.cuda_device import device_info

    return {"tensorrt_version": require_tensorrt(), "device": device_info()}


def build_engine(
    onnx_path: Path,
    profile: TargetProfile,
    out_path: Path,
    *,
    timing_cache: Path | bool = True,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> dict[str, Any]:
    """Build a TensorRT engine for this GPU from an ONNX graph that carries its precisions.

    Args:
        onnx_path: The graph (FP32, FP16-typed or Q/DQ INT8, or a mix).
        profile: Gives the input shape and batch of the optimisation profile, and its name.
        out_path: Where the engine goes (`model.engine`); `model.engine.json` is written beside.
            Both are written atomically, metadata last.
        timing_cache: True: `timing.cache` beside the engine, loaded when present and saved
            after the build, so later builds on this device skip re-timing tactics; a path:
            that file; False: none.
        workspace_bytes: Limit of the builder's scratch memory.

    Returns:
        The metadata written to `model.engine.json`.

    Raises:
        RuntimeNotAvailable: No TensorRT or no CUDA device here.
        ModelError: The graph has nodes TensorRT does not support (listed), shapes that disagree
            with the profile, or the build failed.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise ModelError(f"ONNX graph not found: {onnx_path} (check the path)")
    env = current_environment()
    network = parse_network(onnx_path)
    name, ranges, inputs, outputs = network_io(network[1], profile, onnx_path)
    cache_file = timing_cache_file(out_path, timing_cache)
    settings = build_settings(name, ranges, workspace_bytes, cache_file)
    engine_bytes, build_s = serialize_engine(network, settings, onnx_path)
    atomic_write_bytes(out_path, engine_bytes)
    built = settings.metadata(build_s)
    meta = _metadata(env, profile, onnx_path, engine_bytes, inputs, outputs, built)
    cache_name = cache_file.name if cache_file is not None else None
    mib = workspace_bytes >> 20
    meta["trtexec"] = trtexec_commands(onnx_path, profile, out_path.name, cache_name, mib)
    # Last: load_engine refuses an engine without metadata, so a build cut short is never used.
    write_json(metadata_path(out_path), meta)
    return meta


def _metadata(
    env: dict[str, Any],
    profile: TargetProfile,
    onnx_path: Path,
    engine_bytes: bytes,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The engine's metadata: where it was built, from what, its inputs / outputs, how."""
    return engine_metadata(
        tensorrt_version=env["tensorrt_version"],
        device=env["device"],
        profile_name=profile.name,
        onnx_sha256=sha256_file(onnx_path),
        engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
        inputs=inputs,
        outputs=outputs,
        builder=settings,
    )


@dataclass
class LoadedEngine:
    """A deserialised engine and the metadata it was checked against."""

    engine: trt.ICudaEngine
    metadata: dict[str, Any]
    path: Path


def load_engine(path: Path) -> LoadedEngine:
    """Deserialise an engine built by `build_engine`, only on a matching device and TensorRT.

    Raises:
        RuntimeNotAvailable: No TensorRT or no CUDA device here.
        ModelError: No or malformed metadata, an engine file changed since it was built, or an
            engine built for another GPU model, compute capability or TensorRT version (the
            message says to rebuild it on this device).
    """
    path = check_file(path, "engine", ModelError, ENGINE_MAX_BYTES)
    meta = read_engine_metadata(path)
    env = current_environment()
    check_engine_metadata(meta, env["tensorrt_version"], env["device"], path)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["engine_sha256"]:
        raise ModelError(
            f"{path} does not match its metadata (the engine's sha256 differs): the file changed "
            "after it was built; rebuild the engine"
        )
    from polygraphy.backend.trt import engine_from_bytes
    from polygraphy.exception import PolygraphyException

    try:
        engine: trt.ICudaEngine = engine_from_bytes(data)
    except PolygraphyException as exc:
        raise ModelError(
            f"{path}: TensorRT could not load the engine ({squash(str(exc))}); rebuild it on "
            "this device"
        ) from None
    return LoadedEngine(engine=engine, metadata=meta, path=path)


def engine_for_onnx(onnx_path: Path, profile: TargetProfile, cache_dir: Path | None = None) -> Path:
    """An engine of `onnx_path` for this device and profile, built once and then reused.

    Engines are kept under `cache_dir` (default `$PIPELINE_CACHE/tensorrt`), in a folder per
    TensorRT version and GPU model, named by the graph's sha256 and the input shape, with one
    timing cache per folder shared by every build there.

    Raises:
        Same as `build_engine`.
    """
    env = current_environment()
    folder = Path(cache_dir or default_cache_dir()) / environment_dir_name(
        env["tensorrt_version"], env["device"]
    )
    engine = folder / engine_cache_name(sha256_file(onnx_path), profile)
    if engine.is_file() and _reusable(engine, env, profile):
        return engine
    build_engine(onnx_path, profile, engine, timing_cache=folder / TIMING_CACHE_NAME)
    return engine


def _reusable(engine: Path, env: dict[str, Any], profile: TargetProfile) -> bool:
    try:
        meta = read_engine_metadata(engine)
        check_engine_metadata(meta, env["tensorrt_version"], env["device"], engine)
        check_input_shape(meta, (profile.input.batch, *profile.input.shape), engine)
    except ModelError as exc:
        logger.info("rebuilding cached engine %s: %s", engine, exc)
        return False
    return sha256_file(engine) == meta["engine_sha256"]
