"""The plain-data side of TensorRT engines: optimisation-profile shapes, engine metadata and
the checks made before an engine is loaded, and one-line messages for parser failures.

Nothing here needs TensorRT or a GPU, so all of it is tested everywhere; `exporters.tensorrt`
feeds it what TensorRT reports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import utc_stamp
from pipeline.core.errors import ModelError
from pipeline.core.files import CONFIG_MAX_BYTES, load_json
from pipeline.core.profile import TargetProfile

ENGINE_FORMAT = 1
CACHE_ENV = "PIPELINE_CACHE"

_META_KEYS = ("format", "tensorrt_version", "device", "inputs", "engine_sha256")
_LIST_LIMIT = 5


@dataclass(frozen=True)
class ShapeRange:
    """The min / opt / max shapes of one input in an optimisation profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    def covers(self, shape: Sequence[int]) -> bool:
        """Whether an input of `shape` lies inside the range, axis by axis."""
        shape = tuple(int(d) for d in shape)
        return len(shape) == len(self.min) and all(
            lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max, strict=True)
        )


def profile_shapes(
    input_name: str, dims: Sequence[int | None], chw: Sequence[int], batch: int
) -> ShapeRange:
    """The optimisation profile of the image input: batch 1 up to the profile's batch.

    The minimum is batch 1 (validation runs a last, smaller chunk), the optimum and maximum the
    profile's batch, which is what latency is measured at. Channels, height and width come from
    the profile. A graph with a fixed batch gets exactly that batch.

    Args:
        input_name: The input's name, for messages.
        dims: The graph's input dims; -1, 0 or None for a dynamic axis.
        chw: The profile's (C, H, W).
        batch: The profile's batch size.

    Returns:
        The ShapeRange of the (B, C, H, W) input.

    Raises:
        ModelError: The input is not 4-D, or a fixed axis disagrees with the profile.
    """
    fixed = [int(d) if d is not None and int(d) > 0 else -1 for d in dims]
    chw = tuple(int(d) for d in chw)
    if len(fixed) != 4:
        raise ModelError(
            f"input '{input_name}' has rank {len(fixed)}; an image model takes (batch, C, H, W)"
        )
    for have, want in zip(fixed[1:], chw, strict=True):
        if have not in (-1, want):
            raise ModelError(
                f"input '{input_name}' has shape {_dims_text(fixed)}, the profile gives "
                f"input.shape {list(chw)}; fix the profile's input.shape or re-export the model"
            )
    if fixed[0] == -1:
        return ShapeRange((1, *chw), (batch, *chw), (batch, *chw))
    if fixed[0] != batch:
        raise ModelError(
            f"input '{input_name}' has a fixed batch of {fixed[0]}, the profile measures batch "
            f"{batch}; export with a dynamic batch axis or set the profile's input.batch to "
            f"{fixed[0]}"
        )
    static = (batch, *chw)
    return ShapeRange(static, static, static)


@dataclass(frozen=True)
class ParserIssue:
    """One error of TensorRT's ONNX parser, as plain data (node -1: not tied to a node)."""

    node: int
    name: str
    op: str
    domain: str
    code: str
    desc: str


def parser_failure_message(onnx_path: Path, issues: Sequence[ParserIssue]) -> str:
    """One line saying why TensorRT cannot take the graph, naming unsupported nodes first.

    Args:
        onnx_path: The graph, for the message.
        issues: The parser's errors.

    Returns:
        A one-line message that ends with what to do.
    """
    unsupported = [i for i in issues if i.code.startswith("UNSUPPORTED") and i.node >= 0]
    if unsupported:
        seen: dict[tuple[str, str], ParserIssue] = {}
        for issue in unsupported:
            seen.setdefault((issue.op, issue.name), issue)
        nodes = [_node_text(i) for i in seen.values()]
        more = f" (and {len(nodes) - _LIST_LIMIT} more)" if len(nodes) > _LIST_LIMIT else ""
        return (
            f"{onnx_path}: TensorRT does not support {len(nodes)} node(s) of this graph: "
            f"{', '.join(nodes[:_LIST_LIMIT])}{more}; replace those ops with standard ONNX ops "
            "(or register TensorRT plugins for them) before building an engine"
        )
    detail = squash(issues[0].desc) if issues else "no error was recorded"
    return (
        f"{onnx_path}: TensorRT's ONNX parser rejected the graph: {detail}; "
        "check it with onnx.checker and re-export it"
    )


def _node_text(issue: ParserIssue) -> str:
    op = f"{issue.domain}::{issue.op}" if issue.domain not in ("", "ai.onnx") else issue.op
    return f"{op or '?'} (node '{issue.name or issue.node}')"


def squash(text: str, limit: int = 200) -> str:
    """Text on one line, shortened: TensorRT messages span lines, user errors may not."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def engine_metadata(
    *,
    tensorrt_version: str,
    device: dict[str, Any],
    profile_name: str,
    onnx_sha256: str,
    engine_sha256: str,
    inputs: dict[str, dict[str, Any]],
    outputs: dict[str, dict[str, Any]],
    builder: dict[str, Any],
) -> dict[str, Any]:
    """The record written beside an engine as `<name>.engine.json`.

    Args:
        tensorrt_version: `tensorrt.__version__` of the builder.
        device: `device_info()` of the building GPU: name and compute capability.
        profile_name: The target profile the engine was built for.
        onnx_sha256: Hash of the ONNX graph it was built from.
        engine_sha256: Hash of the serialized engine, so a swapped file is refused.
        inputs: {name: {"min", "opt", "max", "dtype"}} of the optimisation profile.
        outputs: {name: {"shape", "dtype"}} (-1 marks a dynamic axis).
        builder: Builder settings (workspace, strong typing, TF32, timing cache, build time).

    Returns:
        A JSON-ready dict.
    """
    return {
        "format": ENGINE_FORMAT,
        "tensorrt_version": tensorrt_version,
        "device": {"name": device["name"], "compute_capability": device["compute_capability"]},
        "profile": profile_name,
        "onnx_sha256": onnx_sha256,
        "engine_sha256": engine_sha256,
        "inputs": inputs,
        "outputs": outputs,
        "builder": builder,
        "created": utc_stamp(),
    }


def _describe(version: str, device: dict[str, Any]) -> str:
    return (
        f"{device.get('name', '?')} (compute capability {device.get('compute_capability', '?')})"
        f" with TensorRT {version}"
    )


def check_engine_metadata(
    meta: dict[str, Any], tensorrt_version: str, device: dict[str, Any], engine_path: Path
) -> None:
    """Refuse an engine built for another GPU model, compute capability or TensorRT version.

    Raises:
        ModelError: One line: what the engine was built for, what this machine has, and that
            the engine must be rebuilt on this device.
    """
    if meta.get("format") != ENGINE_FORMAT:
        raise ModelError(
            f"{engine_path}: its metadata has format {meta.get('format')!r}, this version reads "
            f"format {ENGINE_FORMAT}; rebuild the engine on this device from its ONNX graph"
        )
    built_device = meta.get("device", {})
    same = (
        built_device.get("name") == device["name"]
        and built_device.get("compute_capability") == device["compute_capability"]
        and meta.get("tensorrt_version") == tensorrt_version
    )
    if not same:
        built = _describe(meta.get("tensorrt_version", "?"), built_device)
        raise ModelError(
            f"{engine_path} was built for {built} but this machine has "
            f"{_describe(tensorrt_version, device)}; an engine only runs where it was built: "
            "rebuild it on this device from its ONNX graph"
        )


def check_input_shape(meta: dict[str, Any], shape: Sequence[int], engine_path: Path) -> None:
    """Refuse to run an engine on an input outside its optimisation profile.

    Raises:
        ModelError: The shape is outside every input range the metadata records.
    """
    name, spec = next(iter(meta["inputs"].items()))
    ranges = ShapeRange(tuple(spec["min"]), tuple(spec["opt"]), tuple(spec["max"]))
    if not ranges.covers(shape):
        raise ModelError(
            f"{engine_path}: input '{name}' was built for shapes {_dims_text(ranges.min)} to "
            f"{_dims_text(ranges.max)}, asked to run {_dims_text(shape)}; rebuild the engine "
            "with this profile's input.shape and input.batch"
        )


def _dims_text(dims: Sequence[int]) -> str:
    return "x".join("?" if int(d) < 0 else str(int(d)) for d in dims)


def metadata_path(engine_path: Path) -> Path:
    """`model.engine` -> `model.engine.json`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_engine_metadata(engine_path: Path) -> dict[str, Any]:
    """The metadata beside an engine.

    Raises:
        ModelError: No metadata file (the engine was not built by this tool), or a malformed one.
    """
    path = metadata_path(engine_path)
    if not path.is_file():
        raise ModelError(
            f"{engine_path}: no {path.name} beside it; only engines built by this tool are "
            "loaded, since their metadata says which device and TensorRT version they run on: "
            "build the engine on this device from its ONNX graph"
        )
    try:
        meta = load_json(path, "engine metadata", ModelError, CONFIG_MAX_BYTES)
    except ModelError as exc:
        raise ModelError(f"{path}: unreadable engine metadata ({squash(str(exc))})") from None
    missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing or not meta["inputs"]:
        raise ModelError(
            f"{path}: engine metadata lacks {', '.join(missing) or 'inputs'}; rebuild the engine"
        )
    return meta


def engine_cache_name(onnx_sha256: str, profile: TargetProfile) -> str:
    """File name of the cached engine of one graph at one profile input shape and batch."""
    dims = _dims_text((profile.input.batch, *profile.input.shape))
    return f"{onnx_sha256[:16]}-{dims}.engine"


def environment_dir_name(tensorrt_version: str, device: dict[str, Any]) -> str:
    """A folder name unique to one TensorRT version on one GPU model."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(device["name"])).strip("-").lower() or "gpu"
    cc = str(device["compute_capability"]).replace(".", "")
    return f"trt{tensorrt_version}-{slug}-sm{cc}"


def default_cache_dir() -> Path:
    """Where engines built from ONNX graphs on demand are kept (`$PIPELINE_CACHE/tensorrt`)."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "pipeline") / "tensorrt"
