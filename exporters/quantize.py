"""Write a policy's precisions into an ONNX graph: INT8 by ONNX Runtime static quantization,
FP16 by typing the layers float16 (`exporters.fp16`).

Only the layers the policy puts in INT8 are quantized (`nodes_to_quantize`); every other layer
keeps float weights and float inputs, so the graph is exactly the policy and the same file runs
on ONNX Runtime and TensorRT (which reads Q/DQ and float16 tensors as the precision of each
layer).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from exporters.calibration import calibration_reader, calibration_samples
from exporters.compare import run_onnx
from exporters.fp16 import convert_to_fp16
from exporters.inspect_precision import layer_precisions
from exporters.onnx_export import FLOAT_OPS, INT8_OPS, layer_node_map, one_line
from exporters.qdq_graph import foldable_relus, unquantize_float_inputs, unshare_initializers
from pipeline.core.artifacts import atomic_copy, atomic_write_with
from pipeline.core.errors import ModelError, PolicyError
from pipeline.core.policy import Precision
from pipeline.core.profile import Int8Scheme

logger = logging.getLogger(__name__)

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
    *,
    calib_samples: int | None = None,
    activation_overrides: dict[str, dict[str, tuple[float, int]]] | None = None,
    fold_relus: bool = True,
) -> dict[str, Any]:
    """Write a policy's precisions into the graph: INT8 layers Q/DQ, FP16 layers float16.

    INT8 goes first (ONNX Runtime calibrates the float graph), then the FP16 layers are
    converted with Casts at their boundaries (`exporters.fp16`). Layers not listed stay FP32.

    Args:
        fp32_path: An FP32 graph from `export_onnx`.
        out_path: Where the graph goes; written atomically.
        precisions: {layer fqn -> Precision}; layers not listed stay FP32.
        scheme: Q/DQ or QOperator, activation / weight types, per-channel, calibration method.
        calib_inputs: Calibration samples, float32 (N, C, H, W).
        calib_samples: How many samples calibrate (default `scheme.calib_samples`); the search
            passes fewer for speed.
        activation_overrides: {INT8 layer fqn -> {"input" | "output" -> (scale, zero point)}}
            for the layer's input activation and its output (the graph quantizes both),
            imposed instead of calibrated values (steps learned by QAT). Points that are one
            tensor share one Q/DQ pair: the first one listed sets it.
        fold_relus: Fold Relus into INT8 layers (`exporters.qdq_graph.foldable_relus`).

    Returns:
        {"int8_layers", "fp16_layers", "fp32_layers", "scheme", "calib_samples",
        "activation_overrides" (tensors whose scale was imposed), "kept_fp32_nodes" (nodes of
        FP16 layers kept in float32 because they overflow in float16, see
        `exporters.fp16.FP32_ONLY_OPS`), "fp16_casts" (Casts added at precision boundaries)}.

    Raises:
        PolicyError: The policy names a layer the graph does not have.
        DataError: No calibration samples, or not (N, C, H, W).
        ModelError: The written graph does not match the policy, or the model outputs NaN or
            inf on the calibration samples.
    """
    report = _initial_report(precisions, scheme)
    int8, fp16 = report["int8_layers"], report["fp16_layers"]
    model = onnx.load(str(fp32_path))
    _node_map(model, list(precisions))  # unknown layers are the policy's fault: say so first
    if not int8 and not fp16:
        atomic_copy(fp32_path, Path(out_path))
        return report
    if int8:
        limit = calib_samples if calib_samples is not None else scheme.calib_samples
        samples = calibration_samples(calib_inputs, limit)
        overrides = activation_overrides
        model, done = _to_int8(Path(fp32_path), precisions, scheme, samples, overrides, fold_relus)
        report.update(done)
    if fp16:
        report.update(_to_fp16(model, fp16, [n for n in precisions if n not in set(fp16)]))
    _verify(model, precisions)
    atomic_write_with(Path(out_path), lambda tmp: onnx.save(model, str(tmp)))
    return report


def _initial_report(precisions: dict[str, Precision], scheme: Int8Scheme) -> dict[str, Any]:
    """The report before any conversion: the layers by precision, nothing calibrated or cast."""
    by_precision = {p: [name for name, q in precisions.items() if q == p] for p in Precision}
    return {
        "int8_layers": by_precision[Precision.INT8],
        "fp16_layers": by_precision[Precision.FP16],
        "fp32_layers": by_precision[Precision.FP32],
        "scheme": scheme.model_dump(),
        "calib_samples": 0,
        "activation_overrides": [],
        "kept_fp32_nodes": [],
        "fp16_casts": 0,
    }


def _to_int8(
    fp32_path: Path,
    precisions: dict[str, Precision],
    scheme: Int8Scheme,
    samples: np.ndarray,
    activation_overrides: dict[str, dict[str, tuple[float, int]]] | None,
    fold_relus: bool,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize the INT8 layers (in a scratch folder); the graph and the part of the report it
    owns."""
    with tempfile.TemporaryDirectory(prefix="quantize-") as work:
        model, overridden = _quantize(
            fp32_path, Path(work), precisions, scheme, samples, activation_overrides, fold_relus
        )
    return model, {"calib_samples": len(samples), "activation_overrides": overridden}


def _to_fp16(model: onnx.ModelProto, layers: list[str], others: list[str]) -> dict[str, Any]:
    """Convert the FP16 layers' nodes in place; the part of the report it owns."""
    nodes = layer_node_map(model, [*layers, *others], op_types=(*FLOAT_OPS, *INT8_OPS))
    done = convert_to_fp16(model, [nodes[n] for n in layers], [nodes[n] for n in others])
    if done.kept_fp32_nodes:
        logger.info("kept in float32 inside FP16 layers: %s", ", ".join(done.kept_fp32_nodes))
    return {"kept_fp32_nodes": done.kept_fp32_nodes, "fp16_casts": done.casts}


def _quantize(
    fp32_path: Path,
    work: Path,
    precisions: dict[str, Precision],
    scheme: Int8Scheme,
    samples: np.ndarray,
    activation_overrides: dict[str, dict[str, tuple[float, int]]] | None,
    fold_relus: bool = True,
) -> tuple[onnx.ModelProto, list[str]]:
    """Preprocess, quantize the INT8 nodes, clean float layers' inputs, check the INT8 layers.

    Returns the quantized graph and the tensors whose activation scale was imposed.
    """
    model, nodes = _prepared(fp32_path, work / "pre.onnx", list(precisions))
    int8_layers = [name for name, p in precisions.items() if p == Precision.INT8]
    int8_nodes = [nodes[name] for name in int8_layers]
    int8_map = {name: nodes[name] for name in int8_layers}
    overrides = _tensor_overrides(model, int8_map, activation_overrides or {}, scheme)
    unshare_initializers(model)
    folded = foldable_relus(model, set(int8_nodes), overrides, scheme) if fold_relus else []
    prepared, quant = work / "prepared.onnx", work / "quant.onnx"
    onnx.save(model, str(prepared))
    # The calibrators print progress to stdout; keep it out of the CLI's progress display.
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        _quantize_static(prepared, quant, model, int8_nodes + folded, scheme, samples, overrides)
    logger.debug("onnxruntime quantizer: %s", chatter.getvalue().strip())
    quantized = onnx.load(str(quant))
    float_nodes = {n.name for n in quantized.graph.node if n.op_type in FLOAT_OPS}
    unquantize_float_inputs(quantized, float_nodes - set(int8_nodes))
    # FP16 layers are still float32 here: check INT8 against everything else being float.
    as_float = {n: Precision.FP32 if p == Precision.FP16 else p for n, p in precisions.items()}
    _verify(quantized, as_float)
    return quantized, sorted(overrides)


def _tensor_overrides(
    model: onnx.ModelProto,
    nodes: dict[str, str],
    activation_overrides: dict[str, dict[str, tuple[float, int]]],
    scheme: Int8Scheme,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """ORT's `TensorQuantOverrides` for the INT8 layers' input and output activations.

    `nodes` maps each INT8 layer to its node. The format (read in onnxruntime.quantization.
    tensor_quant_overrides): {tensor name -> [{"scale": float32 array, "zero_point": array of
    the activation type}]}; one dict in the list means per-tensor.
    """
    unknown = sorted(set(activation_overrides) - set(nodes))
    if unknown:
        raise PolicyError(
            f"activation scales given for layer '{unknown[0]}', which the policy does not put "
            "in INT8"
        )
    by_name = {n.name: n for n in model.graph.node}
    zp_type = np.uint8 if scheme.activation_type == "uint8" else np.int8
    overrides: dict[str, list[dict[str, np.ndarray]]] = {}
    for fqn, sides in activation_overrides.items():
        node = by_name[nodes[fqn]]
        for side, (scale, zero_point) in sides.items():
            tensor = node.input[0] if side == "input" else node.output[0]
            qparams = {
                "scale": np.array(scale, np.float32),
                "zero_point": np.array(zero_point, zp_type),
            }
            overrides.setdefault(tensor, [qparams])
    return overrides


def _quantize_static(
    prepared: Path,
    out: Path,
    model: onnx.ModelProto,
    int8_nodes: list[str],
    scheme: Int8Scheme,
    samples: np.ndarray,
    overrides: dict[str, list[dict[str, np.ndarray]]],
) -> None:
    op_types = {n.op_type for n in model.graph.node if n.name in set(int8_nodes)}
    try:
        quantize_static(
            str(prepared),
            str(out),
            calibration_reader(model, samples),
            quant_format=_FORMATS[scheme.format],
            op_types_to_quantize=sorted(op_types),
            per_channel=scheme.per_channel,
            activation_type=_TYPES[scheme.activation_type],
            weight_type=_TYPES[scheme.weight_type],
            # Only the policy's INT8 layers; an empty list would mean "everything" to ORT.
            nodes_to_quantize=int8_nodes,
            calibrate_method=_CALIBRATION[scheme.calibration],
            extra_options=_extra_options(scheme, overrides),
        )
    except Exception:
        # ONNX Runtime's message for non-finite activations is "scale issue": say what it means
        if not np.isfinite(run_onnx(prepared, samples)).all():
            raise ModelError(
                "the model outputs NaN or inf on the calibration images, so INT8 cannot be "
                "calibrated: its weights are broken or its fine-tune diverged (try a lower "
                "finetune.lr)"
            ) from None
        raise


def _extra_options(
    scheme: Int8Scheme, overrides: dict[str, list[dict[str, np.ndarray]]]
) -> dict[str, Any]:
    extra: dict[str, Any] = {
        # Signed activations are for TensorRT, which only takes a zero point of 0, and only
        # dequantizes int8: a bias quantized to int32 fails its parser, so biases stay float.
        "ActivationSymmetric": scheme.activation_type == "int8",
        "QuantizeBias": scheme.activation_type != "int8",
    }
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    return extra


def _prepared(
    fp32_path: Path, out: Path, layers: list[str]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The graph to quantize and its {layer -> node}: ORT's pre-pass output when usable."""
    raw = onnx.load(str(fp32_path))
    raw_nodes = _node_map(raw, layers)
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


def _verify(model: onnx.ModelProto, precisions: dict[str, Precision]) -> None:
    """Refuse a quantized graph whose layers do not run in the precision the policy asked for."""
    actual = layer_precisions(model, list(precisions))
    wrong = [name for name, p in precisions.items() if actual[name] != p]
    if wrong:
        name = wrong[0]
        raise ModelError(
            f"the exported graph does not run as the policy asks: layer '{name}' runs in "
            f"{actual[name].value}, policy says {precisions[name].value}"
            f"{f' (and {len(wrong) - 1} more layers)' if len(wrong) > 1 else ''}"
        )
