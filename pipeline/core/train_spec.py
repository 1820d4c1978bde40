"""TrainSpec: how long and how hard a fine-tune trains (plain data; `pipeline.model.finetune`
runs it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSpec:
    """How long and how hard to train; `kd_weight` 0 disables distillation."""

    steps: int = 200
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 5e-4
    kd_weight: float = 0.0
    seed: int = 0
    schedule: str = "cosine"  # "cosine" decays lr to 0; "onecycle" warms up first (from scratch)
    # Training batches to re-estimate BatchNorm statistics on after the steps (0: none); see
    # `pipeline.model.finetune.recalibrate_batchnorm`
    bn_batches: int = 0
