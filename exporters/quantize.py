"""Write a policy's INT8 layers into an ONNX graph with ONNX Runtime static quantization.

Only the layers the policy puts in INT8 are quantized (`nodes_to_quantize`); every other layer
keeps float weights and float inputs, so the graph is exactly the policy and the same file runs
on ONNX Runtime and TensorRT (which reads Q/DQ as the precision of each layer).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from exporters.inspect_precision import layer_precisions
from exporters.onnx_export import FLOAT_OPS, layer_node_map, one_line
from pipeline.artifacts import atomic_write_with
from pipeline.errors import DataError, ModelError, PolicyError
from pipeline.policy import Precision
from pipeline.profile import Int8Scheme

logger = logging.getLogger(__name__)

CALIB_BATCH = 8  # at most; small batches keep the calibrator's per-batch tensors small

_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_CALIBRATION = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


def quantize_onnx(
    fp32_path: Path,
    out_path: Path,
    precisions: dict[str, Precision],
    scheme: Int8Scheme,
    calib_inputs: np.ndarray,
) -> dict[str, Any]:
    """Quantize exactly the INT8 layers of a policy; all others stay FP32.

    Args:
        fp32_path: An FP32 graph from `export_onnx`.
        out_path: Where the quantized graph goes; written atomically.
        precisions: {layer fqn -> Precision}; layers not listed stay FP32.
        scheme: Q/DQ or QOperator, activation / weight types, per-channel, calibration method.
        calib_inputs: Calibration samples, float32 (N, C, H, W); the first
            `scheme.calib_samples` are used.

    Returns:
        {"int8_layers", "fp32_layers", "scheme", "calib_samples"}.

    Raises:
        PolicyError: A layer asks for FP16, or names a layer the graph does not have.
        DataError: No calibration samples, or not (N, C, H, W).
        ModelError: The quantized graph does not match the policy.
    """
    fp16 = [name for name, p in precisions.items() if p == Precision.FP16]
    if fp16:
        raise PolicyError(
            f"per-layer FP16 is not supported by the ONNX Runtime exporter yet (layer '{fp16[0]}'"
            f"{f' and {len(fp16) - 1} more' if len(fp16) > 1 else ''}); use int8 or fp32"
        )
    int8 = [name for name, p in precisions.items() if p == Precision.INT8]
    report = {
        "int8_layers": int8,
        "fp32_layers": [name for name, p in precisions.items() if p == Precision.FP32],
        "scheme": scheme.model_dump(),
        "calib_samples": 0,
    }
    if not int8:
        _node_map(onnx.load(str(fp32_path), load_external_data=False), list(precisions))
        atomic_write_with(Path(out_path), lambda tmp: shutil.copyfile(fp32_path, tmp))
        return report
    samples = _calibration_samples(calib_inputs, scheme.calib_samples)
    with tempfile.TemporaryDirectory(prefix="quantize-") as work:
        model = _quantize(Path(fp32_path), Path(work), precisions, scheme, samples)
    atomic_write_with(Path(out_path), lambda tmp: onnx.save(model, str(tmp)))
    report["calib_samples"] = len(samples)
    return report


def _quantize(
    fp32_path: Path,
    work: Path,
    precisions: dict[str, Precision],
    scheme: Int8Scheme,
    samples: np.ndarray,
) -> onnx.ModelProto:
    """Preprocess, quantize the INT8 nodes, clean FP32 layers' inputs, and verify the result."""
    model, nodes = _prepared(fp32_path, work / "pre.onnx", list(precisions))
    int8_nodes = [nodes[name] for name, p in precisions.items() if p == Precision.INT8]
    _unshare_initializers(model)
    prepared, quant = work / "prepared.onnx", work / "quant.onnx"
    onnx.save(model, str(prepared))
    # The calibrators print progress to stdout; keep it out of the CLI's progress display.
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        _quantize_static(prepared, quant, model, int8_nodes, scheme, samples)
    logger.debug("onnxruntime quantizer: %s", chatter.getvalue().strip())
    quantized = onnx.load(str(quant))
    float_nodes = {n.name for n in quantized.graph.node if n.op_type in FLOAT_OPS}
    _unquantize_float_inputs(quantized, float_nodes - set(int8_nodes))
    _verify(quantized, precisions)
    return quantized


def _quantize_static(
    prepared: Path,
    out: Path,
    model: onnx.ModelProto,
    int8_nodes: list[str],
    scheme: Int8Scheme,
    samples: np.ndarray,
) -> None:
    op_types = {n.op_type for n in model.graph.node if n.name in set(int8_nodes)}
    quantize_static(
        str(prepared),
        str(out),
        _ArrayReader(_graph_input(model).name, samples, _static_batch(model)),
        quant_format=_FORMATS[scheme.format],
        op_types_to_quantize=sorted(op_types),
        per_channel=scheme.per_channel,
        activation_type=_TYPES[scheme.activation_type],
        weight_type=_TYPES[scheme.weight_type],
        # Only the policy's INT8 layers; an empty list would mean "everything" to ORT.
        nodes_to_quantize=int8_nodes,
        calibrate_method=_CALIBRATION[scheme.calibration],
        # Signed activations are for TensorRT, which only takes a zero point of 0.
        extra_options={"ActivationSymmetric": scheme.activation_type == "int8"},
    )


def _prepared(
    fp32_path: Path, out: Path, layers: list[str]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The graph to quantize and its {layer -> node}: ORT's pre-pass output when usable."""
    raw = onnx.load(str(fp32_path))
    raw_nodes = _node_map(raw, layers)  # unknown layers are the policy's fault: say so first
    try:
        quant_pre_process(str(fp32_path), str(out))
        model = onnx.load(str(out))
        return model, layer_node_map(model, layers)
    except Exception as exc:
        # The pre-pass (symbolic shape inference + graph optimisation) is recommended but
        # fails on some graphs (unusual ops, data-dependent shapes), and a fusion could rename
        # a layer's node; quantization works without it, only with less tensor information.
        logger.warning("quantization pre-processing skipped: %s", one_line(exc))
        return raw, raw_nodes


def _node_map(model: onnx.ModelProto, layers: list[str]) -> dict[str, str]:
    try:
        return layer_node_map(model, layers)
    except ValueError as exc:
        raise PolicyError(f"policy does not fit the exported graph: {exc}") from None


def _calibration_samples(calib_inputs: np.ndarray, limit: int) -> np.ndarray:
    samples = np.asarray(calib_inputs, dtype=np.float32)[:limit]
    if samples.ndim != 4 or len(samples) == 0:
        raise DataError(
            f"INT8 calibration needs float32 samples shaped (N, C, H, W) with N >= 1, "
            f"got shape {tuple(samples.shape)}; give the run a calibration split"
        )
    return samples


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {t.name for t in model.graph.initializer}  # old opsets list them as inputs
    return next(i for i in model.graph.input if i.name not in initializers)


def _static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a graph insists on, or None when the batch axis is dynamic."""
    dim = _graph_input(model).type.tensor_type.shape.dim
    return dim[0].dim_value if dim and dim[0].HasField("dim_value") else None


class _ArrayReader(CalibrationDataReader):
    """Feeds calibration samples to ORT in small batches (or the graph's fixed batch)."""

    def __init__(self, input_name: str, samples: np.ndarray, static_batch: int | None) -> None:
        self._feeds = iter([{input_name: b} for b in _batches(samples, static_batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _batches(samples: np.ndarray, static_batch: int | None) -> list[np.ndarray]:
    """Split (N, C, H, W) samples into contiguous (b, C, H, W) batches the graph accepts."""
    if static_batch is None:
        # Equal batches, all samples used: ORT's entropy / percentile collectors stack each
        # tensor's per-batch outputs into one array and fail on a short last batch.
        step = max(b for b in range(1, CALIB_BATCH + 1) if len(samples) % b == 0)
        count = len(samples)
    else:
        # A fixed-batch graph takes only full batches: drop the short tail rather than pad it
        # with repeats, but repeat a set smaller than one batch (repeats leave min/max as is).
        if len(samples) < static_batch:
            samples = np.resize(samples, (static_batch, *samples.shape[1:]))
        step, count = static_batch, len(samples) // static_batch * static_batch
    return [np.ascontiguousarray(samples[i : i + step]) for i in range(0, count, step)]


def _unshare_initializers(model: onnx.ModelProto) -> None:
    """Give each Conv / Gemm / MatMul its own copy of any initializer it shares.

    ORT's pre-pass merges identical constants (e.g. the all-zero biases of BN-folded convs), and
    the quantizer rewrites a shared initializer for all its consumers: an FP32 layer would then
    read a bias quantized with an INT8 neighbour's scales.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input if name in initializers)
    for node in graph.node:
        if node.op_type not in FLOAT_OPS:
            continue
        for k, name in enumerate(node.input):
            if uses.get(name, 0) > 1:
                uses[name] -= 1
                copy = graph.initializer.add()
                copy.CopyFrom(initializers[name])
                copy.name = f"{name}__{node.name}"
                node.input[k] = copy.name


def _unquantize_float_inputs(model: onnx.ModelProto, float_nodes: set[str]) -> None:
    """Feed FP32 layers the float tensor where the quantizer put a Q -> DQ pair in front.

    In QDQ form the quantizer rewires *every* consumer of an activation it quantizes, so an FP32
    layer sharing its input with an INT8 one (ResNet's downsample branch) would read rounded
    values. Dequantized outputs of real INT8 ops (QOperator) are left alone.
    """
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.name not in float_nodes:
            continue
        for k, name in enumerate(node.input):
            source = _fake_quant_source(name, producers)
            if source is not None:
                node.input[k] = source
    _drop_dead_qdq(model)


def _fake_quant_source(name: str, producers: dict[str, onnx.NodeProto]) -> str | None:
    """The float tensor `x` when `name` is the output of DequantizeLinear(QuantizeLinear(x))."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def _drop_dead_qdq(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used
        ]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _verify(model: onnx.ModelProto, precisions: dict[str, Precision]) -> None:
    """Refuse a quantized graph whose layers do not run in the precision the policy asked for."""
    actual = layer_precisions(model, list(precisions))
    wrong = [name for name, p in precisions.items() if actual[name] != p]
    if wrong:
        name = wrong[0]
        raise ModelError(
            f"ONNX Runtime did not quantize the graph as the policy asks: layer '{name}' runs in "
            f"{actual[name].value}, policy says {precisions[name].value}"
            f"{f' (and {len(wrong) - 1} more layers)' if len(wrong) > 1 else ''}"
        )
