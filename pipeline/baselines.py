"""Baselines measured in the same run, on the same runner, as the deployed model.

- `uniform`: uniform pruning (FP32, the plain baseline) at the keep ratio whose measured
  latency matches the deployed model's, found by bisection on measured latency, then given the
  same full recovery fine-tune as the deployed model.
- `uniform_int8` (or `uniform_fp16`): the same in the precision the search pruned in, when that
  is not FP32 (the precision in which the whole original measured fastest): a hand-picked
  `uniform:R:int8` at matched latency, the harder baseline.
- `int8`: the unpruned original with every layer in INT8.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.evaluate import accuracy
from pipeline.finetune import train
from pipeline.policy import Precision, policy_layers, uniform_policy
from pipeline.prune import count_macs_params, prune_model

if TYPE_CHECKING:
    from pipeline.run import RunContext

BASELINES = "baselines"  # folder of the run directory holding the baselines' ONNX graphs


def _export(ctx: RunContext, model, precision: Precision, path: Path) -> None:
    from exporters import export_onnx, quantize_onnx
    from pipeline.evaluate import stack

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, ctx.input_shape, fp32, ctx.config.opset)
        precisions = dict.fromkeys(policy_layers(model), precision)
        quantize_onnx(fp32, path, precisions, ctx.profile.int8, stack(ctx.splits.calib)[0])


def _pruned(ctx: RunContext, keep: float):
    model = copy.deepcopy(ctx.original)
    policy = uniform_policy(model, keep, Precision.FP32)  # precisions are applied at export
    prune_model(
        model, policy, ctx.input_shape, ctx.profile.channel_multiple, ctx.profile.min_keep_ratio
    )
    return model


def _latency(ctx: RunContext, path: Path) -> float:
    """One round, enough to steer the bisection."""
    return ctx.bench({"step": path}, rounds=1)["step"]["latency_ms"][ctx.profile.measure.statistic]


def matched_keep_ratio(
    ctx: RunContext, target_ms: float, precision: Precision, tmp: Path, steps: int = 7
) -> float:
    """Bisection on measured latency for the uniform keep ratio matching `target_ms`.

    Latency is a noisy staircase in the keep ratio (channels round to a multiple), so of every
    ratio measured on the way, the one whose latency came closest to the target is returned.
    """
    low, high = ctx.profile.min_keep_ratio, 1.0
    tried: list[tuple[float, float]] = []
    for i in range(steps):
        mid = (low + high) / 2
        path = tmp / f"bisect{i}.onnx"
        _export(ctx, _pruned(ctx, mid), precision, path)
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
    bench = ctx.bench({"side": path})["side"]  # measured like the deployed model
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


def _uniform(ctx: RunContext, precision: Precision, tmp: Path, path: Path) -> dict[str, Any]:
    """Uniform pruning in `precision` at the deployed model's latency, fully fine-tuned."""
    from pipeline.run import stage

    target = ctx.results["deployed"]["latency_ms"][ctx.profile.measure.statistic]
    stage(
        f"baseline: uniform pruning in {precision.value} at the deployed model's measured "
        "latency (bisection)"
    )
    keep = matched_keep_ratio(ctx, target, precision, tmp)
    uniform = _pruned(ctx, keep)
    ft = ctx.config.finetune
    train(
        uniform,
        ctx.splits.train,
        ft.spec(ctx.config.seed),
        ctx.original,
        f"uniform {precision.value} baseline",
        ctx.config.show_progress,
    )
    _export(ctx, uniform, precision, path)
    return _side(ctx, uniform, path, {"keep_ratio": keep, "precision": precision.value})


def run_baselines(ctx: RunContext) -> None:
    """Fill ctx.results["baselines"] with the uniform and all-INT8 baselines."""
    from pipeline.run import stage

    baselines: dict[str, Any] = {}
    searched = Precision(ctx.results.get("search", {}).get("search_precision", "fp32"))
    kept = ctx.run_dir / BASELINES  # the baselines' graphs, to re-measure them anywhere
    kept.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        default = ctx.profile.default_precision
        baselines["uniform"] = _uniform(ctx, default, tmp, kept / "uniform.onnx")
        if searched != default:
            name = f"uniform_{searched.value}"
            baselines[name] = _uniform(ctx, searched, tmp, kept / f"{name}.onnx")
        if Precision.INT8 in ctx.profile.precisions:
            stage("baseline: the original with every layer in INT8")
            _export(ctx, ctx.original, Precision.INT8, kept / "int8.onnx")
            baselines["int8"] = _side(ctx, ctx.original, kept / "int8.onnx", {"keep_ratio": 1.0})
    ctx.results["baselines"] = baselines
