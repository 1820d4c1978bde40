"""DECORE's masked training session over a copy of the original model (`ChannelGating`)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from pipeline.model.data import Splits
from pipeline.model.finetune import batch_stream


class ChannelGate:
    """DECORE's joint training: a copy of the model whose channels are multiplied by masks.

    A mask multiplies the output of every BatchNorm (or, without one, every Conv/Linear) of a
    coupling group, so a dropped channel contributes exactly zero downstream, residuals included.
    """

    def __init__(self, model: nn.Module, splits: Splits, input_shape, seed: int) -> None:
        from pipeline.search.space import coupling_groups

        self.model = copy.deepcopy(model).train()
        self.loader_seed = seed
        groups = coupling_groups(self.model, input_shape)
        modules = dict(self.model.named_modules())
        self.groups: dict[str, int] = {}
        self._masks: dict[str, torch.Tensor] = {}
        for layer, group in groups.items():
            width = _out_width(modules[layer])
            self.groups.setdefault(group, width)
            target = _following_norm(self.model, layer) or modules[layer]
            target.register_forward_hook(self._hook(group))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self._batches = batch_stream(splits.train, 64, seed)

    def _hook(self, group: str):
        def hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            mask = self._masks.get(group)
            if mask is None:
                return output
            shape = (1, -1) + (1,) * (output.dim() - 2)  # (B, C, H, W) or (B, C)
            return output * mask.view(shape)

        return hook

    def step(self, masks: dict[str, torch.Tensor]) -> np.ndarray:
        """One training step with `masks` applied; per-sample correctness of that batch."""
        self._masks = {g: m.detach().float() for g, m in masks.items()}
        x, y = next(self._batches)
        logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return (logits.argmax(1) == y).numpy()


def _out_width(module: nn.Module) -> int:
    return int(module.out_channels if isinstance(module, nn.Conv2d) else module.out_features)


def _following_norm(model: nn.Module, layer: str) -> nn.Module | None:
    """The BatchNorm right after `layer` in registration order, if it normalises its output."""
    order = list(model.named_modules())
    idx = [n for n, _ in order].index(layer)
    width = _out_width(order[idx][1])
    for _, module in order[idx + 1 : idx + 3]:
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) and module.num_features == width:
            return module
        if isinstance(module, nn.Conv2d | nn.Linear):
            return None
    return None
