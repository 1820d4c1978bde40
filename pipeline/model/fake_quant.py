"""Fake quantization of a model's INT8 layers, as ONNX Runtime's Q/DQ graph runs them.

Used by quantization-aware training (`pipeline.model.qat`) to train, and by validation to
rebuild what a QAT graph computes. Only forwards are swapped (instance attributes, removed by
`detach_fake_quant`): modules, parameters and state_dict keys stay as they are.

- Weights: symmetric int8 (per channel or per tensor) on the weight the graph holds, with a
  following BatchNorm folded in (frozen statistics), as the ONNX exporter folds it; the step is
  max|W| / 127, what ONNX Runtime computes from the exported weight.
- Activations: each INT8 layer's input and output (after its folded BatchNorm) per tensor, in the
  scheme's type, with a learned step and a fixed zero point; points that are one tensor in the
  graph share one quantizer.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.profile import Int8Scheme
from pipeline.model.evaluate import torch_logits

log = logging.getLogger(__name__)

SIDES = ("input", "output")
_WEIGHT_QMAX = 127  # symmetric int8 weights: [-127, 127], zero point 0
_Norm = nn.BatchNorm1d | nn.BatchNorm2d


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quantization with a learned step and a fixed zero point.

    The step is learned as its logarithm: updates are relative, so a step of 0.01 and one of
    0.3 train alike, and it never turns negative.
    """

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(max(scale, 1e-8))))
        self.register_buffer("zero_point", torch.tensor(float(zero_point)))
        self.qmin, self.qmax = qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.exp(self.log_scale)
        q = torch.clamp(_round_ste(x / s) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * s

    def qparams(self) -> tuple[float, int]:
        return float(torch.exp(self.log_scale.detach())), int(self.zero_point)


def activation_qparams(lo: float, hi: float, activation_type: str) -> tuple[float, int]:
    """(scale, zero point) from a calibrated range, as ONNX Runtime's MinMax computes them."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if activation_type == "int8":  # symmetric, zero point 0, range [-127, 127]
        return max(abs(lo), abs(hi)) / 127 or 1.0, 0
    scale = (hi - lo) / 255 or 1.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _qrange(activation_type: str) -> tuple[int, int]:
    return (-127, 127) if activation_type == "int8" else (0, 255)


def fake_quant_weight(
    weight: torch.Tensor, fold: torch.Tensor | None, per_channel: bool
) -> torch.Tensor:
    """Symmetric int8 fake quantization of the weight the graph holds (BatchNorm folded in).

    Args:
        weight: (out, ...) conv or linear weight.
        fold: (out,) gamma / sqrt(var + eps) of the BatchNorm the exporter folds in, or None.
        per_channel: one step per output channel (else one for the tensor).

    Returns:
        The weight to use with the BatchNorm still applied after the layer.
    """
    view = (-1,) + (1,) * (weight.dim() - 1)
    if fold is not None:
        fold = torch.where(fold.abs() < 1e-12, torch.full_like(fold, 1e-12), fold).view(view)
        weight = weight * fold
    step = _weight_step(weight.detach(), per_channel)
    quantized = torch.clamp(_round_ste(weight / step), -_WEIGHT_QMAX, _WEIGHT_QMAX) * step
    return quantized / fold if fold is not None else quantized


def _weight_step(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Symmetric int8 step of a weight (out, ...): one per output channel, or one in all."""
    dims = tuple(range(1, weight.dim())) if per_channel else tuple(range(weight.dim()))
    return (weight.abs().amax(dim=dims, keepdim=True) / _WEIGHT_QMAX).clamp(min=1e-12)


def folded_norms(model: nn.Module) -> dict[str, nn.Module]:
    """{layer fqn -> the BatchNorm that directly and only consumes its output}.

    These are the pairs the ONNX exporter folds. Found by tracing with torch.fx; a model that
    does not trace gets no folding (QAT then quantizes the unfolded weight, an approximation).
    """
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # dynamic control flow, unsupported ops
        log.warning("QAT cannot trace %s (%s): weights are quantized unfolded", type(model), exc)
        return {}
    modules = dict(model.named_modules())
    pairs = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _Norm):
            continue
        source = node.args[0]
        if (
            getattr(source, "op", None) == "call_module"
            and isinstance(modules.get(source.target), nn.Conv2d | nn.Linear)
            and len(source.users) == 1
        ):
            pairs[source.target] = modules[node.target]
    return pairs


def attach_fake_quant(
    model: nn.Module, layers: list[str], scheme: Int8Scheme, calib: np.ndarray
) -> dict[tuple[str, str], ActivationQuantizer]:
    """Swap the layers' (and their folded BatchNorms') forward for fake-quantized ones.

    Returns:
        {(layer fqn, "input" | "output") -> its quantizer}; points that are one tensor share it.
    """
    norms = folded_norms(model)
    groups, ranges = _calibrate(model, layers, norms, calib)
    qmin, qmax = _qrange(scheme.activation_type)
    shared: dict[int, ActivationQuantizer] = {}
    quantizers = {}
    for point, group in groups.items():
        if group not in shared:
            scale, zp = activation_qparams(*ranges[group], scheme.activation_type)
            shared[group] = ActivationQuantizer(scale, zp, qmin, qmax)
        quantizers[point] = shared[group]
    _install(model, layers, quantizers, norms, scheme.per_channel)
    return quantizers


def fake_quantized_logits(
    model: nn.Module, qparams: dict[str, dict[str, Any]], scheme: Int8Scheme, inputs: np.ndarray
) -> np.ndarray:
    """Logits of a copy of `model` fake-quantized with fixed steps (those QAT learned).

    This is what a QAT-recovered graph computes, so it is the reference its fidelity is
    checked against: the float model alone differs from it by design.

    Args:
        model: The QAT-tuned float model.
        qparams: {layer fqn -> {"input" | "output" -> (scale, zero point)}} (`Recovery.qparams`,
            or the same read back from JSON, where the pairs are lists).
        scheme: The INT8 scheme the graph was written with.
        inputs: (N, C, H, W) samples.
    """
    copy_ = copy.deepcopy(model).eval()
    qmin, qmax = _qrange(scheme.activation_type)
    quantizers = {
        (fqn, side): ActivationQuantizer(*sides[side], qmin, qmax)
        for fqn, sides in qparams.items()
        for side in SIDES
    }
    _install(copy_, list(qparams), quantizers, folded_norms(copy_), scheme.per_channel, True)
    return torch_logits(copy_, inputs)


def _install(
    model: nn.Module,
    layers: list[str],
    quantizers: dict[tuple[str, str], ActivationQuantizer],
    norms: dict[str, nn.Module],
    per_channel: bool,
    as_graph: bool = False,
) -> None:
    """Swap the forwards of `layers` (and their folded BatchNorms) for fake-quantized ones.

    `as_graph` (inference only) computes what the Q/DQ graph computes: the BatchNorm folded
    into the weight and bias, and the bias quantized to int32 with step input step x weight
    step. With coarse steps (an outlier channel) the float bias alone moves activations across
    rounding boundaries, so the training forward, which keeps the BatchNorm, would disagree
    with the graph on whole steps.
    """
    modules = dict(model.named_modules())
    make = _graph_forward if as_graph else _layer_forward
    for fqn in layers:
        module, norm = modules[fqn], norms.get(fqn)
        out_q = quantizers[(fqn, "output")]
        module.forward = make(
            module, quantizers[(fqn, "input")], None if norm else out_q, norm, per_channel
        )
        if norm is not None:
            norm.forward = _quantize_only(out_q) if as_graph else _quantized_output(norm, out_q)


def detach_fake_quant(model: nn.Module, layers: list[str]) -> None:
    """Give the layers and their BatchNorms back their own forward."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "fake_quant", False):
            del module.__dict__["forward"]


def _layer_forward(
    module: nn.Module,
    in_q: ActivationQuantizer,
    out_q: ActivationQuantizer | None,
    norm: nn.Module | None,
    per_channel: bool,
):
    def forward(x: torch.Tensor) -> torch.Tensor:
        fold = None
        if norm is not None:  # frozen statistics: the factor the exporter folds in
            fold = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
        weight = fake_quant_weight(module.weight, fold, per_channel)
        x = in_q(x)
        if isinstance(module, nn.Conv2d):
            y = module._conv_forward(x, weight, module.bias)
        else:
            y = F.linear(x, weight, module.bias)
        return out_q(y) if out_q is not None else y

    forward.fake_quant = True  # type: ignore[attr-defined]
    return forward


def _graph_forward(
    module: nn.Module,
    in_q: ActivationQuantizer,
    out_q: ActivationQuantizer | None,
    norm: nn.Module | None,
    per_channel: bool,
):
    """The layer as the Q/DQ graph runs it: folded int8 weight, int32 bias, float accumulate."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = _folded(module, norm)  # (out, ...), (out,)
        step = _weight_step(weight, per_channel)
        weight = torch.clamp(torch.round(weight / step), -_WEIGHT_QMAX, _WEIGHT_QMAX) * step
        bias_step = torch.exp(in_q.log_scale) * step.reshape(-1)  # (out,) or (1,)
        bias = torch.round(bias / bias_step) * bias_step
        x = in_q(x)
        if isinstance(module, nn.Conv2d):
            y = module._conv_forward(x, weight, None) + bias.view(1, -1, 1, 1)
        else:
            y = F.linear(x, weight, bias)
        return out_q(y) if out_q is not None else y

    forward.fake_quant = True  # type: ignore[attr-defined]
    return forward


def _folded(module: nn.Module, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias with the following BatchNorm folded in, as the exporter writes them."""
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else torch.zeros(weight.shape[0])
    if norm is None:
        return weight, bias
    fold = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
    view = (-1,) + (1,) * (weight.dim() - 1)
    return weight * fold.view(view), (bias - norm.running_mean) * fold + norm.bias.detach()


def _quantize_only(out_q: ActivationQuantizer):
    """A folded BatchNorm: the layer already applied it; only its output is quantized."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return out_q(x)

    forward.fake_quant = True  # type: ignore[attr-defined]
    return forward


def _quantized_output(module: nn.Module, out_q: ActivationQuantizer):
    own = type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        return out_q(own(module, x))

    forward.fake_quant = True  # type: ignore[attr-defined]
    return forward


@torch.no_grad()
def _calibrate(
    model: nn.Module,
    layers: list[str],
    norms: dict[str, nn.Module],
    calib: np.ndarray,
    batch: int = 64,
) -> tuple[dict[tuple[str, str], int], dict[int, tuple[float, float]]]:
    """Group the quantized points by the tensor they are, and each group's range over `calib`."""
    modules = dict(model.named_modules())
    seen: dict[tuple[str, str], torch.Tensor] = {}
    handles = []
    for fqn in layers:
        handles.append(modules[fqn].register_forward_pre_hook(_record(seen, (fqn, "input"))))
        producer = norms.get(fqn, modules[fqn])
        handles.append(producer.register_forward_hook(_record(seen, (fqn, "output"))))
    groups: dict[tuple[str, str], int] = {}
    ranges: dict[int, tuple[float, float]] = {}
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(calib), batch):
            seen.clear()
            model(torch.from_numpy(np.ascontiguousarray(calib[i : i + batch])))
            if not groups:  # kept alive in `seen`: equal ids are one tensor
                firsts: dict[int, int] = {}
                groups = {p: firsts.setdefault(id(t), k) for k, (p, t) in enumerate(seen.items())}
            for point, tensor in seen.items():
                lo, hi = ranges.get(groups[point], (math.inf, -math.inf))
                ranges[groups[point]] = (min(lo, float(tensor.min())), max(hi, float(tensor.max())))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return groups, ranges


def _record(seen: dict[tuple[str, str], torch.Tensor], point: tuple[str, str]):
    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output=None) -> None:
        seen[point] = inputs[0] if point[1] == "input" else output

    return hook
