"""A policy scaled along its own shape, and policies' graphs exported untrained to measure them:
what the descent under the floor (`pipeline.run.descent`) and the budget's aim
(`pipeline.run.fill`) share."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.policy import LayerAction, Policy
from pipeline.run.context import RunContext


def scaled(
    policy: Policy,
    scale: float,
    head: str,
    min_keep: float,
    weights: dict[str, float] | None = None,
) -> Policy:
    """The policy with every keep ratio but the head's multiplied by `scale` (at least
    `min_keep`, at most 1), or with `weights` by `scale` to the power of the layer's weight (a
    layer not in `weights` is left as it is); precisions and removed blocks unchanged."""

    def power(name: str) -> float:
        if name == head:
            return 0.0
        return 1.0 if weights is None else weights.get(name, 0.0)

    layers = {
        name: action
        if power(name) == 0.0
        else LayerAction(
            _keep(action.keep_ratio * scale ** power(name), min_keep), action.precision
        )
        for name, action in policy.layers.items()
    }
    return Policy(layers, policy.removed, policy.channel_scores)


def _keep(ratio: float, min_keep: float) -> float:
    return min(1.0, max(min_keep, ratio))


def export_untrained(ctx: RunContext, policies: dict[str, Policy], folder: Path) -> dict[str, Path]:
    """Each policy's graph without a fine-tune (the latency is the same), by name."""
    from pipeline.search.materialize import (
        export_graph,
        latency_calibration,
        layer_precisions,
        materialize,
    )

    calib, graphs = latency_calibration(ctx.splits, ctx.profile), {}
    for name, policy in policies.items():
        model = materialize(ctx.original, policy, ctx.profile).model
        graphs[name] = path = folder / f"{name}.onnx"
        export_graph(
            model, layer_precisions(model, policy), ctx.profile, path, calib, ctx.config.opset
        )
    return graphs
