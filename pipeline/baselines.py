"""Baselines measured in the same run, on the same runner, as the deployed model.

- `uniform`: uniform pruning (FP32, the plain baseline) at the keep ratio whose measured
  latency matches the deployed model's, found by bisection on measured latency, then given the
  same full recovery fine-tune as the deployed model.
- `int8`: the unpruned original with every layer in INT8.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench import bench_artifact
from pipeline.evaluate import accuracy
from pipeline.finetune import train
from pipeline.policy import Precision, policy_layers, uniform_policy
from pipeline.prune import count_macs_params, prune_model

if TYPE_CHECKING:
    from pipeline.run import RunContext


def _export(ctx: RunContext, model, precision: Precision, path: Path) -> None:
    from exporters import export_onnx, quantize_onnx
    from pipeline.evaluate import stack

    fp32 = path.with_name(path.stem + ".fp32.onnx")
    export_onnx(model, ctx.input_shape, fp32, ctx.config.opset)
    precisions = dict.fromkeys(policy_layers(model), precision)
    quantize_onnx(fp32, path, precisions, ctx.profile.int8, stack(ctx.splits.calib)[0])


def _pruned(ctx: RunContext, keep: float):
    model = copy.deepcopy(ctx.original)
    policy = uniform_policy(model, keep, ctx.profile.default_precision)
    prune_model(
        model, policy, ctx.input_shape, ctx.profile.channel_multiple, ctx.profile.min_keep_ratio
    )
    return model


def _latency(ctx: RunContext, path: Path) -> float:
    return bench_artifact(ctx.profile, path)["latency_ms"][ctx.profile.measure.statistic]


def matched_keep_ratio(ctx: RunContext, target_ms: float, tmp: Path, steps: int = 7) -> float:
    """Bisection on measured latency for the uniform keep ratio matching `target_ms`.

    Latency is a noisy staircase in the keep ratio (channels round to a multiple), so of every
    ratio measured on the way, the one whose latency came closest to the target is returned.
    """
    low, high = ctx.profile.min_keep_ratio, 1.0
    tried: list[tuple[float, float]] = []
    for i in range(steps):
        mid = (low + high) / 2
        path = tmp / f"bisect{i}.onnx"
        _export(ctx, _pruned(ctx, mid), ctx.profile.default_precision, path)
        latency = _latency(ctx, path)
        tried.append((abs(latency - target_ms), mid))
        if latency <= target_ms:
            low = mid
        else:
            high = mid
    return min(tried)[1]


def _side(ctx: RunContext, model, path: Path, extra: dict[str, Any]) -> dict[str, Any]:
    from exporters import run_onnx

    inputs, labels, _ = ctx.results["_test"]
    bench = bench_artifact(ctx.profile, path)
    macs, params = count_macs_params(model, ctx.input_shape)
    logits = run_onnx(path, inputs, threads=ctx.profile.threads)
    lat = bench["latency_ms"]
    return {
        "accuracy": accuracy(logits, labels),
        "latency_ms": {"median": lat["median"], "p90": lat["p90"], "cv": lat["cv"]},
        "params": params,
        "macs": macs,
        "size_bytes": path.stat().st_size,
        **extra,
    }


def run_baselines(ctx: RunContext) -> None:
    """Fill ctx.results["baselines"] with the uniform and all-INT8 baselines."""
    from pipeline.run import stage

    target = ctx.results["deployed"]["latency_ms"][ctx.profile.measure.statistic]
    baselines: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        stage("baseline: uniform pruning at the deployed model's measured latency (bisection)")
        keep = matched_keep_ratio(ctx, target, tmp)
        uniform = _pruned(ctx, keep)
        ft = ctx.config.finetune
        train(
            uniform,
            ctx.splits.train,
            ft.spec(ctx.config.seed),
            ctx.original,
            "uniform baseline",
            ctx.config.show_progress,
        )
        _export(ctx, uniform, ctx.profile.default_precision, tmp / "uniform.onnx")
        baselines["uniform"] = _side(ctx, uniform, tmp / "uniform.onnx", {"keep_ratio": keep})
        if Precision.INT8 in ctx.profile.precisions:
            stage("baseline: the original with every layer in INT8")
            _export(ctx, ctx.original, Precision.INT8, tmp / "int8.onnx")
            baselines["int8"] = _side(ctx, ctx.original, tmp / "int8.onnx", {"keep_ratio": 1.0})
    ctx.results["baselines"] = baselines
