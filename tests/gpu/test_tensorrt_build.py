"""TensorRT engines built from graphs that carry their precisions, and refused where they do not
belong: another device or version, a changed file, a graph with ops TensorRT lacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from exporters import compare_logits, run_onnx
from exporters.tensorrt import build_engine, engine_for_onnx, load_engine, metadata_path
from pipeline.core.artifacts import sha256_file
from pipeline.core.cuda_device import device_info
from pipeline.core.errors import ModelError
from pipeline.core.policy import Precision
from pipeline.measure.runners import get_runner
from pipeline.model.evaluate import batched_logits

pytestmark = pytest.mark.gpu

PRECISIONS = ("fp32", "fp16", "int8")


def one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def fp32_engine(trt: Any, graphs: dict[str, Path], gpu_profile, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "model.engine"
    build_engine(graphs["fp32"], gpu_profile(), out)
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_build_writes_engine_and_metadata(
    precision: str, trt: Any, graphs: dict[str, Path], gpu_profile, tmp_path: Path
) -> None:
    profile = gpu_profile()
    out = tmp_path / "model.engine"
    meta = build_engine(graphs[precision], profile, out)
    assert out.is_file() and metadata_path(out).is_file()
    assert json.loads(metadata_path(out).read_text()) == meta
    assert meta["tensorrt_version"] == trt.__version__
    assert meta["device"] == device_info()
    assert meta["profile"] == profile.name
    assert meta["onnx_sha256"] == sha256_file(graphs[precision])
    assert meta["engine_sha256"] == sha256_file(out)
    (name, spec), *_ = meta["inputs"].items()
    assert name == "input"
    assert spec["min"] == [1, 3, 32, 32] and spec["opt"] == spec["max"] == [8, 3, 32, 32]
    builder = meta["builder"]
    assert builder["strongly_typed"] is True and builder["tf32"] is False
    assert builder["timing_cache"] == str(tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    loaded = load_engine(out)
    assert loaded.engine.num_io_tensors == 2


@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_validates_against_the_original(
    precision: str, trt: Any, graphs: dict[str, Path], gpu_profile, tmp_path: Path, test_batch
) -> None:
    """The engine's logits against the original FP32 graph on ONNX Runtime's CPU, with the
    tolerance of the precision the graph runs in."""
    profile = gpu_profile()
    engine = tmp_path / "model.engine"
    build_engine(graphs[precision], profile, engine)
    inputs, labels = test_batch
    with get_runner(profile, engine) as runner:
        logits = batched_logits(runner.infer, inputs, profile.input.batch)
    original = run_onnx(graphs["fp32"], inputs)
    result = compare_logits(original, logits, labels, profile.tolerance_for({Precision(precision)}))
    assert result.passed, result.reasons
    assert not result.nan_or_inf


def _edit_metadata(engine: Path, **changes: Any) -> None:
    meta = json.loads(metadata_path(engine).read_text())
    meta.update(changes)
    metadata_path(engine).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({"device": {"name": "NVIDIA Imaginary GPU", "compute_capability": "9.9"}}, "Imaginary"),
        ({"tensorrt_version": "9.0.0.1"}, "TensorRT 9.0.0.1"),
    ],
)
def test_mismatched_engine_is_refused(
    fp32_engine: Path, tmp_path: Path, changes: dict, shown: str
) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(fp32_engine.read_bytes())
    metadata_path(engine).write_text(metadata_path(fp32_engine).read_text())
    load_engine(engine)  # an unchanged copy loads
    _edit_metadata(engine, **changes)
    with pytest.raises(ModelError) as info:
        load_engine(engine)
    msg = one_line(info)
    assert shown in msg and device_info()["name"] in msg
    assert "rebuild it on this device" in msg


def test_changed_or_foreign_engine_is_refused(fp32_engine: Path, tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(fp32_engine.read_bytes() + b"\0")
    metadata_path(engine).write_text(metadata_path(fp32_engine).read_text())
    with pytest.raises(ModelError, match="sha256 differs") as info:
        load_engine(engine)
    one_line(info)
    metadata_path(engine).unlink()
    with pytest.raises(ModelError, match="only engines built by this tool") as info:
        load_engine(engine)
    one_line(info)


def test_timing_cache_is_reused(
    trt: Any, graphs: dict[str, Path], gpu_profile, tmp_path: Path
) -> None:
    profile = gpu_profile()
    first = build_engine(graphs["fp32"], profile, tmp_path / "a.engine")
    cache = tmp_path / "timing.cache"
    assert first["builder"]["timing_cache_reused"] is False
    assert cache.stat().st_size > 0
    second = build_engine(graphs["fp32"], profile, tmp_path / "b.engine")
    assert second["builder"]["timing_cache_reused"] is True
    assert second["builder"]["timing_cache"] == str(cache)
    load_engine(tmp_path / "b.engine")
    none = build_engine(graphs["fp32"], profile, tmp_path / "c" / "c.engine", timing_cache=False)
    assert none["builder"]["timing_cache"] is None
    assert not (tmp_path / "c" / "timing.cache").exists()


def _custom_op_graph(path: Path) -> Path:
    """input -> Relu -> custom.ops::MysteryOp -> Flatten -> output: the custom op has no
    TensorRT importer or plugin."""
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="/relu"),
        helper.make_node("MysteryOp", ["r"], ["m"], name="/mystery", domain="custom.ops"),
        helper.make_node("Flatten", ["m"], ["logits"], name="/flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "custom",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3072])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)]
    )
    onnx.save(model, str(path))
    return path


def test_unsupported_nodes_are_refused(trt: Any, gpu_profile, tmp_path: Path) -> None:
    graph = _custom_op_graph(tmp_path / "custom.onnx")
    out = tmp_path / "model.engine"
    with pytest.raises(ModelError) as info:
        build_engine(graph, gpu_profile(), out)
    msg = one_line(info)
    assert "TensorRT does not support 1 node(s)" in msg
    assert "custom.ops::MysteryOp (node '/mystery')" in msg
    assert not out.exists() and not metadata_path(out).exists()


def test_engines_from_onnx_are_cached_by_hash(
    trt: Any, graphs: dict[str, Path], gpu_profile, tmp_path: Path
) -> None:
    profile = gpu_profile()
    first = engine_for_onnx(graphs["fp32"], profile, cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = engine_for_onnx(graphs["fp32"], profile, cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert first.name.startswith(sha256_file(graphs["fp32"])[:16])
    batch4 = gpu_profile(input={"shape": (3, 32, 32), "batch": 4})
    other = engine_for_onnx(graphs["fp32"], batch4, cache_dir=tmp_path)
    assert other != first and other.parent == first.parent
