"""Recovery fine-tune and training, with optional distillation from the original model.

The distillation loss is N2N's: cross-entropy on the hard labels plus a weighted mean L2 distance
between the student's and the teacher's logits (Ba & Caruana's logit matching).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import Dataset

from pipeline.core.errors import ModelError
from pipeline.core.train_spec import TrainSpec
from pipeline.model.evaluate import loader

log = logging.getLogger(__name__)

# A fine-tune that goes to NaN or inf starts again from its starting weights with the learning
# rate divided by 10, up to this many times: an untrained or badly scaled network (EfficientNet-B6
# at random init has a first gradient norm near 1e4) can blow up in one SGD step
DIVERGENCE_RETRIES = 3

_train_device = "cpu"  # a Ray worker given a GPU switches its whole process to "cuda"


def set_train_device(device: str) -> None:
    """Run every later `train` of this process on `device` ("cpu", "cuda"); models still come
    back to where they were, so export and evaluation are unchanged."""
    global _train_device
    _train_device = device


def batch_stream(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple[Any, Any]]:
    """An endless stream of shuffled training batches, reshuffled (seeded) every epoch."""
    epoch = 0
    while True:
        yield from loader(dataset, batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def _scheduler(opt: torch.optim.Optimizer, spec: TrainSpec) -> torch.optim.lr_scheduler.LRScheduler:
    if spec.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, spec.lr, total_steps=spec.steps)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(spec.steps, 1))


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    kd_weight: float,
) -> torch.Tensor:
    """Cross-entropy plus `kd_weight` times the mean squared logit difference. Shapes (B, K)."""
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is not None and kd_weight > 0:
        loss = loss + kd_weight * F.mse_loss(logits, teacher_logits)
    return loss


def train(
    model: nn.Module,
    dataset: Dataset,
    spec: TrainSpec,
    teacher: nn.Module | None = None,
    description: str = "fine-tune",
    show_progress: bool = True,
) -> nn.Module:
    """Train `model` in place for `spec.steps` SGD steps and return it in eval mode.

    A run that diverges (a non-finite loss, or non-finite outputs after it) is restarted from the
    starting weights at a tenth of the learning rate, at most `DIVERGENCE_RETRIES` times; then
    ModelError.
    """
    if spec.steps <= 0:
        return recalibrate_batchnorm(model, dataset, spec.bn_batches, spec.batch_size, spec.seed)
    start = copy.deepcopy(model.state_dict())
    for retry in range(DIVERGENCE_RETRIES + 1):
        tried = replace(spec, lr=spec.lr / 10**retry)
        if _train_once(model, dataset, tried, teacher, description, show_progress):
            return model
        model.load_state_dict(start)
        if retry < DIVERGENCE_RETRIES:
            log.warning(
                "%s diverged at lr %g; starting again at lr %g",
                description,
                tried.lr,
                tried.lr / 10,
            )
    raise ModelError(
        f"{description} diverged (NaN or inf) at every learning rate from {spec.lr:g} down to "
        f"{spec.lr / 10**DIVERGENCE_RETRIES:g}: the model's weights or inputs are badly scaled "
        "(check its normalization and the input data)"
    )


def _train_once(
    model: nn.Module,
    dataset: Dataset,
    spec: TrainSpec,
    teacher: nn.Module | None,
    description: str,
    show_progress: bool,
) -> bool:
    """One fine-tune; False (and `model` left mid-way, in train mode) if it diverged."""
    torch.manual_seed(spec.seed)
    device = _train_device
    home = next(model.parameters(), torch.empty(0)).device
    model.to(device)  # before the optimizer, so that it holds the parameters it updates
    opt = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay, nesterov=True
    )
    sched = _scheduler(opt, spec)
    teacher = _teacher_on(teacher, device) if spec.kd_weight > 0 else None
    model.train()
    batches = batch_stream(dataset, spec.batch_size, spec.seed)
    with _progress(show_progress) as progress:
        task = progress.add_task(description, total=spec.steps, loss=float("nan"))
        for _ in range(spec.steps):
            x, y = (t.to(device) for t in next(batches))
            opt.zero_grad(set_to_none=True)
            loss = backward_in_chunks(model, x, y, teacher, spec.kd_weight)
            if loss is None:
                model.to(home)
                return False
            opt.step()
            sched.step()
            progress.update(task, advance=1, loss=loss)
    recalibrate_batchnorm(model, dataset, spec.bn_batches, spec.batch_size, spec.seed)
    model.to(home).eval()  # export and evaluation run where the model came from
    return _outputs_finite(model, dataset, spec)


def _teacher_on(teacher: nn.Module | None, device: str) -> nn.Module | None:
    """The teacher in eval mode on `device`: a copy only when it must move (the caller's model
    stays where it is); on its own device it is used as it is, which spares a whole model's
    memory (2.5 GB for ViT-H/14)."""
    if teacher is None:
        return None
    home = next(teacher.parameters(), torch.empty(0)).device
    if home == torch.device(device):
        return teacher.eval()
    return copy.deepcopy(teacher).eval().to(device)


@torch.no_grad()
def _outputs_finite(model: nn.Module, dataset: Dataset, spec: TrainSpec) -> bool:
    """Whether the trained model's outputs on one training batch are all finite: one SGD step
    can leave weights that overflow only on the next forward pass."""
    x, _ = next(batch_stream(dataset, spec.batch_size, spec.seed))
    device = next(model.parameters(), torch.empty(0)).device
    return bool(torch.isfinite(model(x.to(device))).all())


# A training step's forward and backward passes run on chunks of at most this many input values
# (the batch's gradients summed): 64 images of 3x48x48 in one pass, 3x224x224 in chunks of 27.
# A 64-image MobileNetV2 step at 224x224 would otherwise keep ~3.5 GB of activations alive.
TRAIN_CHUNK_VALUES = 1 << 22


def backward_in_chunks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    teacher: nn.Module | None,
    kd_weight: float,
) -> float | None:
    """Accumulate the gradients of the batch's mean loss, in chunks sized to the input; the
    loss, or None if it is not finite (nothing more is computed then)."""
    chunk = max(1, TRAIN_CHUNK_VALUES // max(x[0].numel(), 1))
    total = 0.0
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        with torch.no_grad():
            t_logits = teacher(xs) if teacher is not None and kd_weight > 0 else None
        loss = distillation_loss(model(xs), ys, t_logits, kd_weight) * (len(xs) / len(x))
        if not torch.isfinite(loss):
            return None
        loss.backward()
        total += loss.item()
    return total


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show,
        transient=False,
    )


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, dataset: Dataset, batches: int, batch_size: int = 64, seed: int = 0
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on `batches` training batches.

    Pruning removes channels that fed each BatchNorm, so the statistics the original learned
    describe inputs the pruned network no longer produces; a few forward passes in train mode
    (no gradients, cumulative averages) fix that (EagleEye's adaptive BatchNorm, ECCV 2020).
    Returns the model in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()
    device = next(model.parameters()).device
    stream = batch_stream(dataset, batch_size, seed)
    for _ in range(batches):
        model(next(stream)[0].to(device))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    return model.eval()
