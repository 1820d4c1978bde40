"""Accuracy and agreement metrics, computed in batches on CPU."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def loader(
    dataset: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader on the main process (datasets here are small tensors in memory)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)


def stack(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """All inputs (N, C, H, W) float32 and labels (N,) int64 of a dataset as numpy arrays."""
    xs, ys = [], []
    for x, y in loader(dataset):
        xs.append(x.numpy().astype(np.float32))
        ys.append(y.numpy().astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


# Evaluation batches hold at most this many input values (256 images of 3x48x48; 27 of
# 3x224x224): a 256-image batch at 224x224 keeps over 3 GB of activations alive in MobileNetV2.
EVAL_BATCH_VALUES = 1 << 22


def eval_batch_size(sample_shape: tuple[int, ...], most: int = 256) -> int:
    """Images per evaluation batch for samples of `sample_shape` (C, H, W)."""
    return max(1, min(most, EVAL_BATCH_VALUES // max(int(np.prod(sample_shape)), 1)))


@torch.no_grad()
def torch_logits(model: nn.Module, inputs: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Logits (N, classes) of a PyTorch model in eval mode, in batches sized to the input."""
    model.eval()
    batch_size = batch_size or eval_batch_size(inputs.shape[1:])
    outs = [
        model(torch.from_numpy(inputs[i : i + batch_size])).float().numpy()
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outs)


def batched_logits(
    infer: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch_size: int
) -> np.ndarray:
    """Logits from any `infer(batch) -> logits` callable, e.g. a runner's infer."""
    outs = []
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i : i + batch_size]
        pad = batch_size - len(chunk)
        if pad:  # a static-batch artifact needs full batches: pad, then drop the padding
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs.append(np.asarray(infer(chunk), dtype=np.float32)[: batch_size - pad])
    return np.concatenate(outs)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else 0.0


def model_accuracy(model: nn.Module, dataset: Dataset) -> float:
    inputs, labels = stack(dataset)
    return accuracy(torch_logits(model, inputs), labels)
