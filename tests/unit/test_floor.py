"""The physical latency floor, graph cost counting, peak caching and `pipeline.measure.bench`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from torch import nn

from pipeline.core.errors import MeasurementError, ModelError
from pipeline.core.profile import InputSpec, MeasureSpec, Peaks, TargetProfile
from pipeline.measure.bench import bench_artifact, bench_interleaved, format_bench, measure_artifact
from pipeline.measure.runners import LatencyStats
from pipeline.measure.runners.floor import check_floor, latency_floor_ms, physical_floor
from pipeline.measure.runners.graph_cost import onnx_cost
from pipeline.measure.runners.peaks import cache_path, measure_bandwidth_gbs, measure_peak_gflops

SHAPE = (3, 32, 32)
# Hand-computed per image: out_elems * (Cin / groups) * kh * kw for each conv, N * K for the fc.
CONV_MACS = 8 * 32 * 32 * 27 + 8 * 32 * 32 * 18 + 16 * 16 * 16 * 8 + 10 * 16
CONV_PARAMS = (8 * 27 + 8) + (8 * 18 + 8) + (16 * 8 + 16) + (10 * 16 + 10)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, 10)
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.conv3(x).mean(dim=(2, 3)))


def export(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but still exact
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (torch.randn(1, *SHAPE),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(ConvNet(), tmp_path_factory.mktemp("onnx") / "conv.onnx")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Peaks measured by a test go to its own folder, never to ~/.cache."""
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_profile(**kw: object) -> TargetProfile:
    defaults: dict[str, object] = {
        "name": "t",
        "runtime": "onnxruntime-cpu",
        "input": InputSpec(shape=SHAPE, batch=1),
        "measure": MeasureSpec(warmup=2, repeats=30),
    }
    return TargetProfile(**{**defaults, **kw})


class _Reader:
    """Calibration data for onnxruntime's static quantizer: a few fixed batches."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._batches = iter(
            [{"input": rng.standard_normal((1, *SHAPE), dtype=np.float32)} for _ in range(4)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


# --------------------------------------------------------------------------- cost


@pytest.mark.parametrize("batch", [1, 3])
def test_conv_cost_is_hand_computed(conv_onnx: Path, batch: int) -> None:
    cost = onnx_cost(conv_onnx, (batch, *SHAPE))
    assert cost["macs"] == batch * CONV_MACS
    assert cost["weight_bytes"] == 4 * CONV_PARAMS
    # At least the input and the two full-resolution conv outputs are activations.
    assert cost["activation_bytes"] >= 4 * batch * (3 + 8 + 8) * 32 * 32
    assert cost["int8"] is False and cost["fp16"] is False


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_int8_cost_counts_same_macs(conv_onnx: Path, tmp_path: Path, fmt: str) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    out = tmp_path / f"int8_{fmt}.onnx"
    quantize_static(
        conv_onnx,
        out,
        _Reader(),
        quant_format=getattr(QuantFormat, fmt),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("QLinearConv" in ops) == (fmt == "QOperator")
    cost = onnx_cost(out, (2, *SHAPE))
    assert cost["macs"] == 2 * CONV_MACS
    assert cost["int8"] is True
    # INT8 weights at 1 byte (int32 biases and per-tensor scales add a little).
    assert cost["weight_bytes"] < 4 * CONV_PARAMS / 2


def test_float_weight_feeding_quantize_counts_one_byte(tmp_path: Path) -> None:
    weight = np.ones((8, 3, 3, 3), dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"]),
            helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wdq"]),
            helper.make_node("Conv", ["x", "wdq"], ["y"]),
        ],
        "fakequant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "zp"),
        ],
    )
    path = tmp_path / "fq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    cost = onnx_cost(path, (1, *SHAPE))
    assert cost["macs"] == 8 * 30 * 30 * 27  # no padding: 30x30 outputs
    assert cost["weight_bytes"] == weight.size * 1 + 4 + 1
    assert cost["int8"] is True


def test_cost_errors_are_model_errors(conv_onnx: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff not onnx")
    with pytest.raises(ModelError, match="ONNX"):
        onnx_cost(bad, (1, *SHAPE))
    with pytest.raises(ModelError, match="rank"):
        onnx_cost(conv_onnx, (1, 32, 32))


# --------------------------------------------------------------------------- floor


def test_floor_arithmetic() -> None:
    cost = {"macs": 50_000_000, "weight_bytes": 40_000_000, "int8": False, "fp16": False}
    floor = latency_floor_ms(cost, peaks_gflops=100.0, bandwidth_gbs=10.0, cache_bytes=0)
    assert floor["compute_ms"] == pytest.approx(1.0)  # 1e8 flop at 1e11 flop/s
    assert floor["memory_ms"] == pytest.approx(4.0)  # 4e7 bytes at 1e10 bytes/s
    assert floor["floor_ms"] == pytest.approx(4.0 / 2)
    int8 = latency_floor_ms(
        {**cost, "int8": True}, 100.0, 10.0, cache_bytes=0, low_precision_factor=4.0
    )
    assert int8["floor_ms"] == pytest.approx(4.0 / 4)
    # Weights that fit in the last-level cache need not come from DRAM on every run.
    cached = latency_floor_ms(cost, 100.0, 10.0, cache_bytes=30_000_000)
    assert cached["memory_ms"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        latency_floor_ms(cost, 0.0, 10.0)


def test_floor_rejects_faster_than_physics(conv_onnx: Path, private_cache: Path) -> None:
    profile = make_profile(peaks=Peaks(gflops=100.0, bandwidth_gbs=10.0))
    floor = physical_floor(profile, conv_onnx)
    assert floor is not None and floor["floor_ms"] > 0
    assert floor["macs"] == CONV_MACS and floor["peak_gflops"] == 100.0
    assert not private_cache.exists()  # the profile's peaks override measuring
    impossible = LatencyStats.from_samples([1e-9] * 30, warmup=1, batch=1)
    with pytest.raises(MeasurementError, match="below the physical floor"):
        check_floor(impossible, floor)
    with pytest.raises(MeasurementError):
        check_floor(impossible, floor["floor_ms"])


def test_floor_accepts_real_measurement(conv_onnx: Path) -> None:
    profile = make_profile(threads=1)
    measured = measure_artifact(profile, conv_onnx)
    stats = LatencyStats.from_dict(measured)
    assert stats.repeats == 30 and 0 < measured["floor_ms"] < stats.min_ms
    check_floor(stats, measured["floor_ms"])


def test_no_floor_for_gpu_runtime_without_peaks(conv_onnx: Path) -> None:
    assert physical_floor(make_profile(runtime="tensorrt"), conv_onnx) is None
    given = make_profile(runtime="tensorrt", peaks=Peaks(gflops=1e4, bandwidth_gbs=900.0))
    assert physical_floor(given, conv_onnx) is not None


def test_peaks_are_measured_once_and_cached(private_cache: Path) -> None:
    gflops = measure_peak_gflops(1, sizes=(128,), repeats=2)
    bandwidth = measure_bandwidth_gbs(1, size_mb=16, repeats=2)
    assert gflops > 0 and bandwidth > 0
    data = json.loads(cache_path().read_text())
    (host,) = data.values()
    assert host["gflops_fp32_1thread"] == gflops
    assert host["bandwidth_gbs_1thread_16mb"] == bandwidth
    # Later calls read the cache instead of timing again; more threads are credited linearly.
    assert measure_peak_gflops(1) == gflops
    assert measure_peak_gflops(3) == 3 * gflops
    assert measure_bandwidth_gbs(2, size_mb=16) == 2 * bandwidth


def test_corrupt_cache_is_remeasured(private_cache: Path) -> None:
    private_cache.mkdir(parents=True)
    cache_path().write_text("{not json")
    assert measure_peak_gflops(1, sizes=(64,), repeats=1) > 0
    assert json.loads(cache_path().read_text())


# --------------------------------------------------------------------------- bench


def test_bench_artifact_and_table(conv_onnx: Path) -> None:
    profile = make_profile(input=InputSpec(shape=SHAPE, batch=2), threads=1)
    result = bench_artifact(profile, conv_onnx)
    assert result["runtime"] == "onnxruntime-cpu" and result["threads"] == 1
    assert result["batch"] == 2 and result["repeats"] == 30 and result["warmup"] == 2
    lat = result["latency_ms"]
    assert set(lat) == {"median", "p90", "mean", "min", "cv"}
    assert 0 < lat["min"] <= lat["median"] <= lat["p90"]
    assert result["floor_ratio"] == pytest.approx(lat["median"] / result["floor_ms"])
    assert result["floor_ratio"] > 1
    assert result["noisy"] == (lat["cv"] > profile.measure.max_cv)
    json.dumps(result)  # plain data for report.json
    console = Console(record=True, width=100)
    console.print(format_bench(result))
    text = console.export_text()
    assert "median ms" in text and "physical floor" in text and "conv.onnx" in text


def test_bench_interleaved_alternates_sides_and_takes_medians_over_rounds(
    conv_onnx: Path, tmp_path: Path
) -> None:
    profile = make_profile(input=InputSpec(shape=SHAPE, batch=1), threads=1)
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(conv_onnx.read_bytes())
    order: list[str] = []
    per_side: dict[str, list[dict]] = {"a": [], "b": []}

    def measure(path: Path) -> dict:
        side = "a" if path == conv_onnx else "b"
        order.append(side)
        result = bench_artifact(profile, path)
        per_side[side].append(result)
        return result

    sides = bench_interleaved(measure, {"a": conv_onnx, "b": copy}, rounds=3)
    assert order == ["a", "b", "a", "b", "a", "b"]  # a slow spell hits both sides alike
    for side, results in per_side.items():
        medians = [r["latency_ms"]["median"] for r in results]
        assert sides[side]["rounds_ms"] == medians
        assert sides[side]["latency_ms"]["median"] == pytest.approx(float(np.median(medians)))
        p90s = [r["latency_ms"]["p90"] for r in results]
        assert sides[side]["latency_ms"]["p90"] == pytest.approx(float(np.median(p90s)))
        floor = sides[side]["floor_ms"]
        assert sides[side]["floor_ratio"] == pytest.approx(
            sides[side]["latency_ms"]["median"] / floor
        )
