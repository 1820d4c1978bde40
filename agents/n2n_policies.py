"""N2N's two recurrent policies and what they read: one row of features per removable residual
block (stage 1) and per coupling group left to shrink (stage 2). `agents.n2n` trains them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.core.space import LayerInfo, SearchSpace

BLOCK_FEATURES = 8
GROUP_FEATURES = 12


# ------------------------------------------------------------------------------------ features


def inside(name: str, blocks: tuple[str, ...] | list[str]) -> bool:
    return any(name.startswith(block + ".") for block in blocks)


def _totals(space: SearchSpace) -> tuple[float, float]:
    macs = float(max(sum(layer.macs for layer in space.layers), 1))
    params = float(max(sum(layer.params for layer in space.layers), 1))
    return macs, params


def block_features(space: SearchSpace) -> torch.Tensor:
    """One row per removable block, shape (blocks, BLOCK_FEATURES), values roughly in [0, 1].

    N2N describes each layer by type, kernel, stride, padding, outputs and its place inside a
    skip connection; our unit of removal is a whole residual block, so a row aggregates the
    block's layers: position, layer count, MAC / parameter / measured-latency shares, stride,
    width and kernel.
    """
    macs, params = _totals(space)
    count = len(space.removable_blocks)
    rows = []
    for i, block in enumerate(space.removable_blocks):
        real = [layer for layer in space.layers if inside(layer.name, [block])]
        rows.append(
            [
                i / max(count - 1, 1),
                len(real) / 4,
                sum(layer.macs for layer in real) / macs,
                sum(layer.params for layer in real) / params,
                sum(layer.latency_share for layer in real),
                max((layer.stride for layer in real), default=1) / 2,
                math.log2(max((layer.out_channels for layer in real), default=1)) / 12,
                max((layer.kernel for layer in real), default=1) / 7,
            ]
        )
    return torch.tensor(rows, dtype=torch.float32).reshape(count, BLOCK_FEATURES)


def shrink_groups(space: SearchSpace, removed: tuple[str, ...]) -> list[list[LayerInfo]]:
    """Coupling groups with a prunable layer left after `removed`, in forward order.

    The shrinkage policy acts once per group, not per layer: pruning gives a coupled group the
    largest ratio any of its layers asks for, so separate choices inside a group would be
    overridden silently and blur the credit REINFORCE assigns.
    """
    groups: dict[str, list[LayerInfo]] = {}
    for layer in space.prunable:
        if not inside(layer.name, removed):
            groups.setdefault(layer.group, []).append(layer)
    return list(groups.values())


def group_features(space: SearchSpace, groups: list[list[LayerInfo]]) -> torch.Tensor:
    """One row per group, shape (groups, GROUP_FEATURES): its first layer's shape and kind, and
    the group's summed MAC, parameter and measured-latency shares."""
    macs, params = _totals(space)
    rows = []
    for i, members in enumerate(groups):
        first = members[0]
        rows.append(
            [
                float(first.kind == "conv"),
                float(first.kind == "dwconv"),
                float(first.kind == "linear"),
                first.kernel / 7,
                first.stride / 2,
                math.log2(max(first.out_channels, 1)) / 12,
                math.log2(max(first.in_channels, 1)) / 12,
                sum(layer.macs for layer in members) / macs,
                sum(layer.params for layer in members) / params,
                sum(layer.latency_share for layer in members),
                i / max(len(groups) - 1, 1),
                len(members) / 8,
            ]
        )
    return torch.tensor(rows, dtype=torch.float32).reshape(len(groups), GROUP_FEATURES)


# ------------------------------------------------------------------------------------ policies


class RemovalPolicy(nn.Module):
    """Bidirectional LSTM over blocks -> logit of removing each block (N2N Fig. 2a)."""

    def __init__(self, hidden: int = 32, prior: float = 0.2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(BLOCK_FEATURES, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 1)
        with torch.no_grad():  # start near the prior so early students are not all gutted
            self.head.weight.mul_(0.1)
            self.head.bias.fill_(math.log(prior / (1.0 - prior)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(blocks, F) -> removal logits (blocks,)."""
        out, _ = self.lstm(features.unsqueeze(0))  # (1, blocks, 2H)
        return self.head(out[0]).squeeze(-1)

    def sample(self, features: torch.Tensor, generator: torch.Generator) -> list[int]:
        with torch.no_grad():
            probs = torch.sigmoid(self(features))
            return [int(a) for a in torch.bernoulli(probs, generator=generator)]

    def log_prob(self, features: torch.Tensor, actions: list[int]) -> torch.Tensor:
        logits = self(features)
        a = torch.tensor(actions, dtype=torch.float32)
        return -nn.functional.binary_cross_entropy_with_logits(logits, a, reduction="sum")


class ShrinkPolicy(nn.Module):
    """Autoregressive LSTM over groups -> categorical over keep-ratio bins (N2N Fig. 2b)."""

    def __init__(self, bins: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.bins = bins
        self.lstm = nn.LSTM(GROUP_FEATURES + bins + 1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, bins)

    def _inputs(self, features: torch.Tensor, previous: list[int]) -> torch.Tensor:
        """Features with the previous action one-hot; index `bins` is the start token."""
        onehot = nn.functional.one_hot(torch.tensor(previous), self.bins + 1).float()
        return torch.cat([features, onehot], dim=-1)

    def sample(self, features: torch.Tensor, generator: torch.Generator) -> list[int]:
        actions: list[int] = []
        state = None
        with torch.no_grad():
            for t in range(features.shape[0]):
                previous = actions[-1] if actions else self.bins
                x = self._inputs(features[t : t + 1], [previous]).unsqueeze(0)  # (1, 1, in)
                out, state = self.lstm(x, state)
                probs = torch.softmax(self.head(out[0, 0]), dim=-1)
                actions.append(int(torch.multinomial(probs, 1, generator=generator)))
        return actions

    def log_prob(self, features: torch.Tensor, actions: list[int]) -> torch.Tensor:
        """Teacher-forced log-probability of a whole action sequence (one LSTM pass)."""
        x = self._inputs(features, [self.bins, *actions[:-1]]).unsqueeze(0)  # (1, T, in)
        out, _ = self.lstm(x)
        logp = torch.log_softmax(self.head(out[0]), dim=-1)  # (T, bins)
        return logp.gather(1, torch.tensor(actions).unsqueeze(1)).sum()
