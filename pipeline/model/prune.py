"""Apply a Policy's keep ratios with torch-pruning's dependency graph.

Channels are physically removed. Layers coupled by the graph (a residual stream, a depthwise
convolution and its producer) form one group and must keep the same channels; such a group keeps
the largest ratio any of its layers asks for, so no layer gets fewer channels than requested.
The classifier head's outputs are never pruned.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch_pruning as tp
from pydantic import BaseModel, Field, ValidationError
from torch import nn

from pipeline.core.artifacts import atomic_write_text
from pipeline.core.errors import ModelError, first_line
from pipeline.core.files import POLICY_MAX_BYTES, load_json
from pipeline.core.policy import Policy, head_layer

HISTORY_VERSION = 1


@dataclass
class PruneResult:
    """What pruning did: the pruned model, its history, and per-layer channel counts."""

    model: nn.Module
    history: list[list[Any]]
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)  # fqn -> (before, after)
    group_ratios: dict[str, float] = field(default_factory=dict)  # group root -> kept fraction
    removed: tuple[str, ...] = ()  # blocks replaced by identity

    @property
    def unchanged(self) -> bool:
        """Nothing was removed: the model is still the trained original, which a recovery
        fine-tune can only move away from its optimum."""
        return not self.removed and all(b == a for b, a in self.channels.values())


def count_macs_params(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """MACs and parameters of one forward pass at batch 1."""
    example = torch.zeros(1, *input_shape)
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def channels_to_keep(channels: int, keep_ratio: float, multiple: int, min_keep: float) -> int:
    """Channels a layer keeps: the ratio (at least `min_keep`) rounded to `multiple`.

    Rounding goes to the nearest multiple but never below the minimum keep ratio (rounded up to
    a multiple) and never above the layer's channel count.
    """
    ratio = max(keep_ratio, min_keep)
    floor_keep = max(multiple, math.ceil(channels * min_keep / multiple) * multiple)
    keep = max(round(channels * ratio / multiple) * multiple, floor_keep)
    return min(keep, channels)


ROOTS = (nn.Conv2d, nn.Linear)
# Attention layers of torchvision's transformers (ViT, Swin, MaxViT), by class name
ATTENTION = ("MultiheadAttention", "ShiftedWindowAttention", "ShiftedWindowAttentionV2",
             "RelativePositionalMultiHeadAttention")  # fmt: skip


def unpruned_roots(model: nn.Module, head: nn.Module) -> list[nn.Module]:
    """Layers whose output channels are never pruned: the classifier head, and in a model with
    attention every layer but the hidden layers of its MLPs.

    In a transformer the residual stream's width is tied to the attention heads, to parameters
    (class token, position embedding) and to reshapes into heads or windows that torch-pruning
    cannot follow (on Swin's windows it runs out of memory); an MLP's hidden layer (a Linear
    followed by another Linear in the same Sequential) is coupled to nothing else.
    """
    if not any(type(m).__name__ in ATTENTION for m in model.modules()):
        return [head]
    hidden = set()
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            linears = [m for m in seq if isinstance(m, nn.Linear)]
            hidden.update(id(m) for m in linears[:-1])
    return [m for m in model.modules() if isinstance(m, ROOTS) and id(m) not in hidden]


def dependency_graph(model: nn.Module, input_shape: tuple[int, int, int]) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced at batch 1.

    Raises:
        ModelError: torch-pruning cannot trace the model or map channels through one of its
            operations (ShuffleNet's channel shuffle); the message names the layer nearest to
            the operation it stopped at.
    """
    example = torch.zeros(1, *input_shape)
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as exc:  # tracing failures come in many types; report them as one line
        where = _failing_layer(exc, model)
        at = f" at {where}" if where else ""
        raise ModelError(
            f"torch-pruning could not trace the model{at}: {first_line(exc)} "
            f"({type(exc).__name__}); torch-pruning cannot prune this architecture"
        ) from None


def _failing_layer(exc: BaseException, model: nn.Module) -> str:
    """Where torch-pruning stopped: its innermost graph node in the traceback, named by the
    nearest layer upstream of it ('' when the traceback shows no node)."""
    node = None
    tb = exc.__traceback__
    while tb is not None:
        nodes = [v for v in tb.tb_frame.f_locals.values() if isinstance(v, tp.dependency.Node)]
        node = nodes[0] if nodes else node
        tb = tb.tb_next
    names = {id(m): n for n, m in model.named_modules() if n}
    queue, seen = ([node] if node is not None else []), set()
    while queue:
        current = queue.pop(0)
        if id(current.module) in names:
            op = "" if current is node else f"the {node.type.name.lower()} after "
            return f"{op}layer '{names[id(current.module)]}'"
        seen.add(id(current))
        queue.extend(n for n in current.inputs if id(n) not in seen)
    return ""


def is_grouped_conv(module: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (RegNet, ResNeXt): 1 < groups < in_channels."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels


def group_layers(dg: tp.DependencyGraph, group: Any) -> list[str]:
    """Names of the Conv2d/Linear layers whose output channels this group prunes.

    A group that holds a grouped convolution is left whole (no names): torch-pruning's
    dependency-graph pruning removes channels without keeping them spread evenly over the
    convolution's groups, so the pruned weights would not fit the layer.
    """
    if any(is_grouped_conv(dep.target.module) for dep, _ in group):
        return []
    names = []
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, (nn.Conv2d, nn.Linear)) and dg.is_out_channel_pruning_fn(dep.handler):
            names.append(dg._module2name[module])
    return names


def prune_model(
    model: nn.Module,
    policy: Policy,
    input_shape: tuple[int, int, int],
    multiple: int = 8,
    min_keep: float = 0.1,
) -> PruneResult:
    """Prune `model` in place following `policy`'s keep ratios (magnitude importance)."""
    model.eval()
    head = dict(model.named_modules())[head_layer(model)]
    for name in policy.removed:
        remove_block(model, name)
    dg = dependency_graph(model, input_shape)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    result = PruneResult(model=model, history=[], removed=tuple(policy.removed))
    # Lazily: each group is built after the previous ones were pruned, so index mappings through
    # concatenations (DenseNet, Inception) refer to the channels that are left.
    for group in dg.get_all_groups(
        ignored_layers=unpruned_roots(model, head), root_module_types=ROOTS
    ):
        _prune_group(dg, group, policy, importance, multiple, min_keep, result)
    result.history = [_plain(entry) for entry in dg.pruning_history()]
    return result


def _prune_group(
    dg: tp.DependencyGraph,
    group: Any,
    policy: Policy,
    importance: Any,
    multiple: int,
    min_keep: float,
    result: PruneResult,
) -> None:
    layers = group_layers(dg, group)
    if not layers:
        return
    ratio = max(policy.action(n).keep_ratio for n in layers)
    root = group[0].dep.target.module
    total = dg.get_out_channels(root)
    keep = channels_to_keep(total, ratio, multiple, min_keep)
    result.group_ratios[layers[0]] = keep / total
    before = {n: _out_channels(dg, n) for n in layers}
    if keep < total:
        scores = _scores(policy, layers, group, importance)
        if scores is None:  # torch-pruning cannot rank this group; leave it whole
            return
        drop = torch.argsort(scores)[: total - keep].tolist()
        pruning_group = dg.get_pruning_group(root, group[0].dep.handler, sorted(drop))
        if dg.check_pruning_group(pruning_group):
            pruning_group.prune()
    for n in layers:
        result.channels[n] = (before[n], _out_channels(dg, n))


def _scores(policy: Policy, layers: list[str], group: Any, importance: Any) -> torch.Tensor | None:
    """Channel ranking of a group: the policy's own scores when it gives them, else magnitude."""
    for name in layers:
        if name in policy.channel_scores:
            return torch.tensor(policy.channel_scores[name], dtype=torch.float32)
    return importance(group)


def remove_block(model: nn.Module, name: str) -> None:
    """Replace a residual block by identity (N2N layer removal); its shapes must allow it."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"the model has no block '{name}' to remove") from None
    setattr(parent, child, nn.Identity())


def _out_channels(dg: tp.DependencyGraph, name: str) -> int:
    module = dg.model.get_submodule(name)
    return int(module.out_channels if isinstance(module, nn.Conv2d) else module.out_features)


def _plain(entry: Any) -> list[Any]:
    """A pruning-history entry as JSON-safe plain data: [module name, is_out, [indices]]."""
    name, is_out, idxs = entry
    return [str(name), bool(is_out), [int(i) for i in idxs]]


def save_history(path: Path, history: list[list[Any]], arch: dict[str, Any]) -> None:
    """Write `pruning_history.json`: what to rebuild (`arch`) and the pruning steps, in order."""
    data = {"version": HISTORY_VERSION, "arch": arch, "history": history}
    atomic_write_text(path, json.dumps(data) + "\n")


class HistoryArch(BaseModel):
    """The `arch` of a run's history: what `pipeline validate` rebuilds the model from."""

    model: str
    num_classes: int = Field(ge=1)
    input_shape: tuple[int, int, int]
    removed: list[str] = []


class _History(BaseModel):
    """What `load_history` checks before a model is rebuilt from the file."""

    version: Literal[1]
    arch: dict[str, Any]
    history: list[tuple[str, bool, list[int]]]


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"


def load_history(path: Path) -> dict[str, Any]:
    """Read `pruning_history.json` back, refusing a corrupt or foreign one.

    Raises:
        ModelError: Unreadable, not JSON, another version, or missing parts.
    """
    data = load_json(path, "pruning history", ModelError, POLICY_MAX_BYTES)
    if isinstance(data, dict) and data.get("version") != HISTORY_VERSION:
        raise ModelError(f"{path}: unsupported pruning history version {data.get('version')}")
    try:
        _History.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"{path}: corrupt pruning history ({_first_problem(exc)})") from None
    return data


def history_arch(history: dict[str, Any], path: Path) -> HistoryArch:
    """The architecture a loaded history says to rebuild.

    Raises:
        ModelError: It lacks the model, classes or input shape.
    """
    try:
        return HistoryArch.model_validate(history["arch"])
    except ValidationError as exc:
        raise ModelError(f"{path}: corrupt pruning history (arch.{_first_problem(exc)})") from None


def replay_history(
    model: nn.Module, history: list[list[Any]], input_shape: tuple[int, int, int]
) -> nn.Module:
    """Redo recorded pruning steps on a freshly built original architecture (no pickle).

    Raises:
        ModelError: The steps name layers or channels the architecture does not have.
    """
    dg = dependency_graph(model.eval(), input_shape)
    try:
        dg.load_pruning_history([[n, o, list(i)] for n, o, i in history])
    except Exception as exc:  # torch-pruning's own errors: the history is for another model
        raise ModelError(f"the pruning history does not fit the model: {first_line(exc)}") from exc
    return model
