"""Quantization-aware training (QAT) of the INT8 layers of a model.

The model is fine-tuned with its INT8 layers fake-quantized the way the deployed graph runs them
(`pipeline.model.fake_quant`: per-channel symmetric weights with the BatchNorm folded in, input
and output activations per tensor with learned steps, straight-through rounding). Activation
steps are learned on a log scale from the calibrated ones, as in LSQ (Esser et al., 2020); zero
points stay at their calibrated values. The learned steps are returned in the format of
`quantize_onnx(activation_overrides=...)`; `pipeline.search.int8_recovery` decides when QAT runs
and writes them into the Q/DQ graph.

QAT only swaps forwards while it trains: the model keeps its modules and state_dict keys, so
weights.safetensors and pruning_history.json rebuild it as before.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.core.profile import Int8Scheme
from pipeline.core.train_spec import TrainSpec
from pipeline.model.fake_quant import (
    SIDES,
    ActivationQuantizer,
    attach_fake_quant,
    detach_fake_quant,
)
from pipeline.model.finetune import backward_in_chunks, batch_stream
from pipeline.model.splits import Splits

QatMode = Literal["auto", "always", "never"]
DEFAULT_QAT_SPEC = TrainSpec(steps=200, lr=1e-4, batch_size=64, kd_weight=1.0)
SCALE_LR_FACTOR = 10.0  # activation steps train (on log scale) faster than the weights


def qat_finetune(
    model: nn.Module,
    teacher: nn.Module | None,
    layers: list[str],
    scheme: Int8Scheme,
    splits: Splits,
    calib: np.ndarray,
    spec: TrainSpec,
) -> dict[str, dict[str, tuple[float, int]]]:
    """Fine-tune `model` in place with `layers` fake-quantized; return the learned qparams.

    Returns:
        {layer fqn -> {"input" | "output" -> (scale, zero point)}}, the format of
        `quantize_onnx(activation_overrides=...)`.
    """
    quantizers = attach_fake_quant(model, layers, scheme, calib)
    try:
        _train(model, teacher, quantizers, splits, spec)
    finally:
        detach_fake_quant(model, layers)
    return {fqn: {side: quantizers[(fqn, side)].qparams() for side in SIDES} for fqn in layers}


def _train(
    model: nn.Module,
    teacher: nn.Module | None,
    quantizers: dict[tuple[str, str], ActivationQuantizer],
    splits: Splits,
    spec: TrainSpec,
) -> None:
    """Adam on weights and activation steps; BatchNorms stay frozen (eval) so folding holds."""
    torch.manual_seed(spec.seed)
    steps = {id(q): q.log_scale for q in quantizers.values()}
    # Adam, not SGD: with BatchNorm frozen, a channel of small running variance scales its
    # gradients up, and SGD's momentum blows such a network up within a few steps.
    opt = torch.optim.AdamW(
        [
            {"params": list(model.parameters()), "weight_decay": spec.weight_decay},
            {"params": list(steps.values()), "lr": spec.lr * SCALE_LR_FACTOR, "weight_decay": 0},
        ],
        lr=spec.lr,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(spec.steps, 1))
    teacher = copy.deepcopy(teacher).eval() if teacher is not None and spec.kd_weight > 0 else None
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    batches = batch_stream(splits.train, spec.batch_size, spec.seed)
    for _ in range(spec.steps):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        backward_in_chunks(model, x, y, teacher, spec.kd_weight)
        opt.step()
        sched.step()
    model.eval()
