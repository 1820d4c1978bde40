"""The plain-data side of TensorRT engines and GPU runners, on a machine with neither.

Optimisation-profile shapes, engine metadata and its checks, parser-failure messages, the
TensorRT provider options of ONNX Runtime: all plain functions, tested here without TensorRT.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from exporters.tensorrt_meta import (
    ENGINE_FORMAT,
    ParserIssue,
    ShapeRange,
    check_engine_metadata,
    check_input_shape,
    engine_cache_name,
    engine_metadata,
    environment_dir_name,
    metadata_path,
    parser_failure_message,
    profile_shapes,
    read_engine_metadata,
)
from pipeline.core.artifacts import write_json
from pipeline.core.errors import ModelError, RuntimeNotAvailable
from pipeline.core.profile import InputSpec, TargetProfile

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
ORIN = {"name": "Orin", "compute_capability": "8.7"}


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- profile shapes


def test_dynamic_batch_spans_one_to_profile_batch() -> None:
    ranges = profile_shapes("input", [-1, 3, 48, 48], (3, 48, 48), 8)
    assert ranges == ShapeRange((1, 3, 48, 48), (8, 3, 48, 48), (8, 3, 48, 48))
    assert ranges.to_dict() == {
        "min": [1, 3, 48, 48],
        "opt": [8, 3, 48, 48],
        "max": [8, 3, 48, 48],
    }


def test_dynamic_spatial_axes_take_the_profile_shape() -> None:
    ranges = profile_shapes("x", [None, 3, 0, -1], (3, 32, 24), 4)
    assert ranges.min == (1, 3, 32, 24) and ranges.max == (4, 3, 32, 24)


def test_fixed_batch_is_used_as_is() -> None:
    ranges = profile_shapes("input", [2, 3, 16, 16], (3, 16, 16), 2)
    assert ranges.min == ranges.opt == ranges.max == (2, 3, 16, 16)


@pytest.mark.parametrize(
    ("dims", "chw", "batch", "fragments"),
    [
        ([1, 3, 16, 16], (3, 16, 16), 8, ("fixed batch of 1", "input.batch to 1")),
        ([-1, 3, 16, 16], (3, 32, 32), 1, ("?x3x16x16", "input.shape [3, 32, 32]")),
        ([-1, 16, 16], (3, 16, 16), 1, ("rank 3", "(batch, C, H, W)")),
    ],
)
def test_profile_shape_conflicts_are_one_line_errors(dims, chw, batch, fragments) -> None:
    with pytest.raises(ModelError) as info:
        profile_shapes("input", dims, chw, batch)
    msg = one_line(info)
    for fragment in fragments:
        assert fragment in msg


def test_shape_range_covers_each_axis() -> None:
    ranges = ShapeRange((1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))
    assert ranges.covers((1, 3, 8, 8)) and ranges.covers((3, 3, 8, 8))
    assert not ranges.covers((5, 3, 8, 8))
    assert not ranges.covers((2, 3, 9, 8))
    assert not ranges.covers((2, 3, 8))


# --------------------------------------------------------------------------- parser messages


def issue(node: int, op: str, name: str = "", domain: str = "", code: str = "UNSUPPORTED_NODE"):
    return ParserIssue(node, name, op, domain, code, f"no importer for {op}\nsecond line")


def test_unsupported_nodes_are_listed_on_one_line() -> None:
    issues = [
        issue(3, "MysteryOp", "/block/mystery", "custom.ops"),
        issue(3, "MysteryOp", "/block/mystery", "custom.ops"),  # reported twice: listed once
        issue(7, "Pad", "/pad", "", "UNSUPPORTED_NODE_ATTR"),
    ]
    msg = parser_failure_message(Path("m.onnx"), issues)
    assert "\n" not in msg
    assert msg.startswith("m.onnx: TensorRT does not support 2 node(s)")
    assert "custom.ops::MysteryOp (node '/block/mystery')" in msg
    assert "Pad (node '/pad')" in msg
    assert "replace those ops" in msg


def test_long_unsupported_lists_are_cut() -> None:
    issues = [issue(i, f"Op{i}", f"n{i}") for i in range(8)]
    msg = parser_failure_message(Path("m.onnx"), issues)
    assert "8 node(s)" in msg and "(and 3 more)" in msg
    assert "Op4" in msg and "Op5" not in msg


def test_other_parser_errors_name_the_first_error() -> None:
    issues = [ParserIssue(-1, "", "", "", "INVALID_GRAPH", "bad\n   graph   here")]
    msg = parser_failure_message(Path("m.onnx"), issues)
    assert msg == (
        "m.onnx: TensorRT's ONNX parser rejected the graph: bad graph here; "
        "check it with onnx.checker and re-export it"
    )
    assert "no error was recorded" in parser_failure_message(Path("m.onnx"), [])


# --------------------------------------------------------------------------- metadata


def make_meta(version: str = "10.8.0.43", device: dict | None = None) -> dict:
    return engine_metadata(
        tensorrt_version=version,
        device=device or H100,
        profile_name="gpu-trt",
        onnx_sha256="a" * 64,
        engine_sha256="b" * 64,
        inputs={"input": {**ShapeRange((1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8)).to_dict()}},
        outputs={"logits": {"shape": [-1, 10], "dtype": "FLOAT"}},
        builder={"workspace_bytes": 1 << 30, "strongly_typed": True, "tf32": False},
    )


def test_metadata_is_plain_json() -> None:
    meta = make_meta()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["format"] == ENGINE_FORMAT
    assert meta["device"] == H100 and meta["tensorrt_version"] == "10.8.0.43"
    assert meta["profile"] == "gpu-trt" and meta["builder"]["strongly_typed"] is True


def test_matching_metadata_passes() -> None:
    check_engine_metadata(make_meta(), "10.8.0.43", dict(H100), Path("model.engine"))


@pytest.mark.parametrize(
    ("version", "device", "shown"),
    [
        ("10.8.0.43", ORIN, "Orin (compute capability 8.7)"),
        ("10.8.0.43", {**H100, "compute_capability": "9.1"}, "compute capability 9.1"),
        ("11.4.0.106", H100, "TensorRT 11.4.0.106"),
    ],
)
def test_mismatched_metadata_is_refused(version: str, device: dict, shown: str) -> None:
    with pytest.raises(ModelError) as info:
        check_engine_metadata(make_meta(), version, device, Path("run/model.engine"))
    msg = one_line(info)
    assert msg.startswith("run/model.engine was built for NVIDIA H100 80GB HBM3")
    assert "TensorRT 10.8.0.43" in msg and shown in msg
    assert "rebuild it on this device" in msg


def test_other_metadata_format_is_refused() -> None:
    meta = {**make_meta(), "format": ENGINE_FORMAT + 1}
    with pytest.raises(ModelError, match="rebuild the engine on this device") as info:
        check_engine_metadata(meta, "10.8.0.43", H100, Path("model.engine"))
    one_line(info)


def test_input_shape_outside_the_profile_is_refused() -> None:
    check_input_shape(make_meta(), (4, 3, 8, 8), Path("model.engine"))
    with pytest.raises(ModelError) as info:
        check_input_shape(make_meta(), (8, 3, 8, 8), Path("model.engine"))
    msg = one_line(info)
    assert "1x3x8x8 to 4x3x8x8" in msg and "8x3x8x8" in msg and "rebuild" in msg


def test_metadata_round_trip_and_refusals(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    assert metadata_path(engine) == tmp_path / "model.engine.json"
    with pytest.raises(ModelError, match=r"no model\.engine\.json beside it") as info:
        read_engine_metadata(engine)
    one_line(info)
    meta = make_meta()
    write_json(metadata_path(engine), meta)
    assert read_engine_metadata(engine) == meta
    metadata_path(engine).write_text("{not json")
    with pytest.raises(ModelError, match="unreadable engine metadata") as info:
        read_engine_metadata(engine)
    one_line(info)
    metadata_path(engine).write_text(json.dumps({"format": 1}))
    with pytest.raises(ModelError, match="lacks tensorrt_version, device, inputs"):
        read_engine_metadata(engine)


def test_cache_names_are_safe_and_keyed() -> None:
    profile = TargetProfile(
        name="t", runtime="tensorrt", input=InputSpec(shape=(3, 48, 48), batch=8)
    )
    assert engine_cache_name("0123456789abcdef" * 4, profile) == "0123456789abcdef-8x3x48x48.engine"
    assert environment_dir_name("10.8.0.43", H100) == "trt10.8.0.43-nvidia-h100-80gb-hbm3-sm90"
    assert environment_dir_name(
        "10.3.0", {"name": "Orin (nvgpu)", "compute_capability": "8.7"}
    ) == ("trt10.3.0-orin-nvgpu-sm87")


# --------------------------------------------------------------------------- ONNX Runtime providers


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 10)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def fp32_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporters import export_onnx

    torch.manual_seed(0)
    return export_onnx(TinyNet().eval(), (3, 16, 16), tmp_path_factory.mktemp("g") / "m.onnx")


def test_graph_precisions_read_the_graph(fp32_graph: Path, tmp_path: Path) -> None:
    from exporters import quantize_onnx
    from pipeline.core.policy import Precision
    from pipeline.core.profile import Int8Scheme
    from pipeline.measure.runners.ort_trt import graph_input, graph_precisions

    model = onnx.load(str(fp32_graph))
    assert graph_precisions(model) == set()
    assert graph_input(model) == ("input", [-1, 3, 16, 16])
    scheme = Int8Scheme(activation_type="int8", calib_samples=8)
    calib = np.random.default_rng(0).standard_normal((8, 3, 16, 16), dtype=np.float32)
    int8 = tmp_path / "int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_onnx(fp32_graph, int8, {"conv": Precision.INT8}, scheme, calib)
    assert graph_precisions(onnx.load(str(int8))) == {"int8"}


def test_graph_precisions_see_float16_casts() -> None:
    from pipeline.measure.runners.ort_trt import graph_precisions

    cast = helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16)
    back = helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)
    graph = helper.make_graph(
        [cast, back],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    assert graph_precisions(helper.make_model(graph)) == {"fp16"}


def test_trt_provider_options(tmp_path: Path) -> None:
    from pipeline.measure.runners.ort_trt import trt_provider_options

    ranges = profile_shapes("input", [-1, 3, 16, 16], (3, 16, 16), 4)
    opts = trt_provider_options("input", ranges, tmp_path, {"int8"})
    assert opts["trt_int8_enable"] == "True" and opts["trt_fp16_enable"] == "False"
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path)
    assert opts["trt_profile_min_shapes"] == "input:1x3x16x16"
    assert opts["trt_profile_opt_shapes"] == opts["trt_profile_max_shapes"] == "input:4x3x16x16"
    assert all(isinstance(v, str) for v in opts.values())


def test_ort_trt_cache_sits_beside_the_artifact(fp32_graph: Path) -> None:
    from pipeline.measure.runners.ort_trt import OrtTrtRunner

    profile = TargetProfile(name="t", runtime="onnxruntime-trt", input=InputSpec(shape=(3, 16, 16)))
    runner = OrtTrtRunner(fp32_graph, profile)
    assert runner.cache_dir == fp32_graph.with_name("m.ort-trt-cache")


# --------------------------------------------------------------------------- without TensorRT


def test_build_and_load_need_tensorrt_here(fp32_graph: Path, tmp_path: Path) -> None:
    from exporters.tensorrt import build_engine, load_engine, tensorrt_unavailable_reason
    from pipeline.core.cuda_device import no_cuda_reason

    if tensorrt_unavailable_reason() is None and no_cuda_reason() is None:
        pytest.skip("TensorRT and a GPU are here: tests/gpu covers building engines")
    profile = TargetProfile(name="t", runtime="tensorrt", input=InputSpec(shape=(3, 16, 16)))
    reason = tensorrt_unavailable_reason() or no_cuda_reason()
    with pytest.raises(RuntimeNotAvailable) as info:
        build_engine(fp32_graph, profile, tmp_path / "model.engine")
    assert one_line(info) == reason
    assert not (tmp_path / "model.engine").exists()
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    write_json(metadata_path(engine), make_meta())
    with pytest.raises(RuntimeNotAvailable) as info:
        load_engine(engine)
    one_line(info)


def test_cuda_provider_options_keep_fp32_exact() -> None:
    from pipeline.measure.runners.ort_cuda import cuda_provider_options

    opts = cuda_provider_options()
    assert opts["use_tf32"] == "0" and opts["device_id"] == "0"
    assert all(isinstance(v, str) for v in opts.values())
