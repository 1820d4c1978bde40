"""The one recipe that turns a policy into a model and a graph: copy, prune, recover, export.

Candidates, baselines, INT8 recovery and the run's deployed model are all built through here,
so a change to how a policy is applied (pruning options, the export, the precision pass) reaches
every model a run compares.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.core.policy import Policy, Precision, policy_layers
from pipeline.core.profile import TargetProfile
from pipeline.core.train_spec import TrainSpec
from pipeline.model.data import Splits
from pipeline.model.finetune import train
from pipeline.model.prune import PruneResult, prune_model


@dataclass(frozen=True)
class Recovery:
    """How a pruned copy regains accuracy: a fine-tune on `train`, distilled from `teacher`."""

    spec: TrainSpec
    train: Any  # the training split (a torch Dataset)
    teacher: nn.Module | None = None
    label: str = "recovery"
    show_progress: bool = False


def shape_of(profile: TargetProfile) -> tuple[int, int, int]:
    return tuple(profile.input.shape)  # type: ignore[return-value]


def materialize(
    original: nn.Module,
    policy: Policy,
    profile: TargetProfile,
    recovery: Recovery | None = None,
    min_keep: float | None = None,
) -> PruneResult:
    """A pruned copy of `original` by `policy`, recovered when given a `Recovery`.

    The original is not changed. A policy that removes nothing (precisions only) is not
    fine-tuned: a short fine-tune at the recovery rate only costs accuracy there.
    """
    model = copy.deepcopy(original)
    keep_floor = profile.min_keep_ratio if min_keep is None else min_keep
    result = prune_model(model, policy, shape_of(profile), profile.channel_multiple, keep_floor)
    if recovery is not None and not result.unchanged:
        recover(model, recovery)
    return result


def recover(model: nn.Module, recovery: Recovery) -> None:
    """Fine-tune a pruned model in place (the second half of `materialize`, for callers that
    decide between pruning and training whether the fine-tune is needed)."""
    r = recovery
    train(model, r.train, r.spec, r.teacher, r.label, r.show_progress)


def layer_precisions(model: nn.Module, policy: Policy | Precision) -> dict[str, Precision]:
    """Each prunable layer's precision: the policy's, or one precision for every layer."""
    if isinstance(policy, Precision):
        return dict.fromkeys(policy_layers(model), policy)
    return {n: policy.action(n).precision for n in policy_layers(model)}


def export_graph(
    model: nn.Module,
    precisions: dict[str, Precision],
    profile: TargetProfile,
    path: Path,
    calib: np.ndarray,
    opset: int = 17,
    fp32_path: Path | None = None,
    overrides: dict[str, dict[str, tuple[float, int]]] | None = None,
) -> dict[str, Any]:
    """Write `model` to `path` with `precisions` in the graph; return the quantization report.

    The FP32 export goes to `fp32_path` (beside `path` by default): callers that compare the
    policy's precisions with FP32 keep it.
    """
    from exporters import export_onnx, quantize_onnx

    fp32 = fp32_path or path.with_name(f"{path.stem}_fp32.onnx")
    export_onnx(model, shape_of(profile), fp32, opset)
    return quantize_onnx(
        fp32, path, precisions, profile.int8, calib, activation_overrides=overrides
    )


# Graphs exported to be measured or ranked calibrate INT8 on at most this many images:
# calibration sets the quantization scales, not the graph, so the profile's full set (500 on the
# CPU profile, the slower part of each export) would buy nothing there.
LATENCY_CALIB_SAMPLES = 64


def calibration(splits: Splits, samples: int) -> np.ndarray:
    """The first `samples` calibration images, float32 (N, C, H, W)."""
    from pipeline.model.evaluate import stack

    return stack(splits.calib)[0][:samples]


def latency_calibration(splits: Splits, profile: TargetProfile) -> np.ndarray:
    """The calibration images of a graph exported to be measured or ranked, not shipped."""
    return calibration(splits, min(profile.int8.calib_samples, LATENCY_CALIB_SAMPLES))
