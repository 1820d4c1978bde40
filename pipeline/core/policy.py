"""The Policy: per-layer keep ratio and precision, keyed by the module's fully qualified name.

This is the plain data that flows through the product: agents produce it, `prune.py` and the
exporters consume it, `policy.json` stores it. Nothing here touches a model's weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import PolicyError

if TYPE_CHECKING:  # torch is imported where a model is walked: the measuring process needs none
    from torch import nn


class Precision(str, Enum):
    """Numeric precision a layer runs in on the target."""

    INT8 = "int8"
    FP16 = "fp16"
    FP32 = "fp32"


@dataclass(frozen=True)
class LayerAction:
    """What happens to one layer: the fraction of output channels kept and its precision."""

    keep_ratio: float = 1.0
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise PolicyError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")


@dataclass(frozen=True)
class Policy:
    """A mapping {layer fqn -> LayerAction}; layers not listed keep all channels in FP32.

    Two optional parts serve the agents that need them: `removed` names residual blocks that
    become identity (N2N's layer removal), and `channel_scores` ranks the channels of a layer
    (higher is kept first) instead of weight magnitude (DECORE's learned keep probabilities).
    """

    layers: dict[str, LayerAction] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    channel_scores: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def action(self, name: str) -> LayerAction:
        return self.layers.get(name, LayerAction())

    def precisions(self) -> dict[str, Precision]:
        return {name: a.precision for name, a in self.layers.items()}

    def keep_ratios(self) -> dict[str, float]:
        return {name: a.keep_ratio for name, a in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        layers = {
            n: {"keep_ratio": round(a.keep_ratio, 6), "precision": a.precision.value}
            for n, a in self.layers.items()
        }
        data: dict[str, Any] = {"version": 1, "layers": layers}
        if self.removed:
            data["removed"] = list(self.removed)
        if self.channel_scores:
            data["channel_scores"] = {n: list(v) for n, v in self.channel_scores.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "policy") -> Policy:
        """Read `to_dict`'s form back; anything else is a PolicyError naming what is wrong.

        Raises:
            PolicyError: Not an object with a 'layers' mapping, a `version` other than
                `POLICY_VERSION`, a key this version does not have, or a malformed part.
        """
        layers = data.get("layers") if isinstance(data, dict) else None
        if not isinstance(layers, dict):
            raise PolicyError(f"{source}: expected an object with a 'layers' mapping")
        _check_header(data, source)
        parsed: dict[str, LayerAction] = {}
        for name, raw in layers.items():
            parsed[str(name)] = _parse_action(raw, f"{source}: layer '{name}'")
        removed = data.get("removed", [])
        if not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
            raise PolicyError(f"{source}: 'removed' must be a list of module names")
        return cls(parsed, tuple(removed), _parse_scores(data.get("channel_scores", {}), source))

    def save(self, path: Path) -> None:
        from pipeline.core.artifacts import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Policy:
        from pipeline.core.files import POLICY_MAX_BYTES, load_json

        return cls.from_dict(load_json(path, "policy", PolicyError, POLICY_MAX_BYTES), str(path))


POLICY_VERSION = 1
_POLICY_KEYS = ("version", "layers", "removed", "channel_scores")


def _check_header(data: dict[str, Any], source: str) -> None:
    """A version this tool does not know, or keys it would not read, are refused: a policy
    read differently from how it was meant would compress the wrong model silently."""
    version = data.get("version", POLICY_VERSION)  # files written by hand may omit it
    if version != POLICY_VERSION or isinstance(version, bool):
        raise PolicyError(
            f"{source}: policy version {version!r} is not supported (this tool reads version "
            f"{POLICY_VERSION}); write the policy in version {POLICY_VERSION}'s form"
        )
    unknown = sorted(str(k) for k in data if k not in _POLICY_KEYS)
    if unknown:
        raise PolicyError(
            f"{source}: unknown key '{unknown[0]}'; a policy has {', '.join(_POLICY_KEYS)}"
        )


def _parse_scores(scores: Any, source: str) -> dict[str, tuple[float, ...]]:
    def numbers(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        )

    if not isinstance(scores, dict) or not all(numbers(v) for v in scores.values()):
        raise PolicyError(f"{source}: 'channel_scores' must map layer names to lists of numbers")
    return {str(n): tuple(float(x) for x in v) for n, v in scores.items()}


def _parse_action(raw: Any, where: str) -> LayerAction:
    if not isinstance(raw, dict) or set(raw) - {"keep_ratio", "precision"}:
        raise PolicyError(f"{where}: expected {{'keep_ratio': float, 'precision': str}}")
    try:
        precision = Precision(raw.get("precision", "fp32"))
    except ValueError:
        allowed = ", ".join(p.value for p in Precision)
        raise PolicyError(
            f"{where}: unknown precision {raw.get('precision')!r}; use {allowed}"
        ) from None
    keep = raw.get("keep_ratio", 1.0)
    if not isinstance(keep, (int, float)) or isinstance(keep, bool):
        raise PolicyError(f"{where}: keep_ratio must be a number")
    try:
        return LayerAction(float(keep), precision)
    except PolicyError as exc:
        raise PolicyError(f"{where}: {exc}") from None


def policy_layers(model: nn.Module) -> list[str]:
    """Fully qualified names of the layers a policy can address (Conv2d and Linear), in order."""
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def head_layer(model: nn.Module) -> str:
    """The classifier head: the last Linear (or last Conv2d when there is no Linear)."""
    from torch import nn

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = linears or policy_layers(model)
    if not layers:
        raise PolicyError("the model has no Conv2d or Linear layers to compress")
    return layers[-1]


def uniform_policy(model: nn.Module, keep_ratio: float, precision: Precision) -> Policy:
    """Same keep ratio and precision everywhere; the classifier head keeps all its outputs."""
    head = head_layer(model)
    return Policy(
        {n: LayerAction(1.0 if n == head else keep_ratio, precision) for n in policy_layers(model)}
    )


def parse_policy_arg(spec: str, model: nn.Module, default_precision: Precision) -> Policy:
    """Parse the CLI's `--policy`: `uniform:R[:PRECISION]` or a path to a policy JSON file."""
    if spec.startswith("uniform:"):
        parts = spec.split(":")
        try:
            ratio = float(parts[1])
            precision = Precision(parts[2]) if len(parts) > 2 else default_precision
        except (ValueError, IndexError):
            raise PolicyError(
                f"--policy {spec!r}: expected uniform:KEEP_RATIO[:int8|fp16|fp32], "
                "e.g. uniform:0.5 or uniform:0.5:int8"
            ) from None
        if len(parts) > 3 or not 0.0 < ratio <= 1.0:
            raise PolicyError(f"--policy {spec!r}: the keep ratio must be in (0, 1]")
        return uniform_policy(model, ratio, precision)
    return Policy.load(Path(spec))


def check_policy(policy: Policy, model: nn.Module, allowed: list[Precision]) -> None:
    """Refuse a policy naming layers the model lacks or precisions the target does not allow."""
    known = policy_layers(model)
    unknown = [n for n in [*policy.layers, *policy.channel_scores] if n not in known]
    modules = dict(model.named_modules())
    unknown += [n for n in policy.removed if n not in modules]
    if unknown:
        sample = ", ".join(known[:4]) + (", ..." if len(known) > 4 else "")
        raise PolicyError(
            f"policy names unknown layer '{unknown[0]}'"
            f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; "
            f"layers of this model are fully qualified module names such as {sample}"
        )
    for name, action in policy.layers.items():
        if action.precision not in allowed:
            names = ", ".join(p.value for p in allowed)
            raise PolicyError(
                f"policy gives layer '{name}' precision {action.precision.value}, "
                f"which the target profile does not allow (allowed: {names})"
            )
