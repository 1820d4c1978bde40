"""The export stage: model.onnx with the policy's precisions in the graph, checked to have taken
and to be no slower than FP32 on the target."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.core.artifacts import write_json
from pipeline.core.policy import LayerAction, Policy, Precision, policy_layers
from pipeline.core.records import Latency, PrecisionCheck, RunRecord
from pipeline.model.models import save_safetensors
from pipeline.model.prune import count_macs_params
from pipeline.run.context import RunContext, stage


def export_deployed(ctx: RunContext, record: RunRecord) -> None:
    """Write model.onnx with the policy's precisions inside the graph; check they took.

    INT8 that loses too much accuracy after calibration is recovered with a quantization-aware
    fine-tune (`finetune.qat`); `ctx.model` becomes the model model.onnx holds.
    """
    from exporters import layer_precisions
    from pipeline.search.int8_recovery import recover_int8

    stage("exporting model.onnx with the policy's precisions")
    layers = policy_layers(ctx.model)  # removed blocks' layers are gone
    ft = ctx.config.finetune
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "pruned_fp32.onnx"
        recovery = recover_int8(
            ctx.model,
            ctx.original if ft.kd_weight > 0 else None,
            ctx.policy,
            ctx.profile,
            ctx.splits,
            ctx.run_dir / "model.onnx",
            mode=ft.qat,
            spec=ft.qat_spec(ctx.config.seed),
            fp32_path=fp32,
            opset=ctx.config.opset,
            notify=stage,
        )
        if recovery.info["method"] == "qat":  # the deployed weights are the QAT-tuned ones
            ctx.model = recovery.model
            save_safetensors(ctx.model, ctx.run_dir / "weights.safetensors")
        measurable = ctx.runtime_missing is None
        if measurable and {ctx.policy.action(n).precision for n in layers} != {Precision.FP32}:
            record.precision_check = _check_not_slower(ctx, record, fp32)
    shipped_fp32 = record.precision_check is not None and record.precision_check.shipped == "fp32"
    if recovery.qparams and not shipped_fp32:
        from pipeline.run.validate import QAT_SCALES

        write_json(ctx.run_dir / QAT_SCALES, recovery.qparams)  # validation's reference
    actual = layer_precisions(ctx.run_dir / "model.onnx", layers)
    mismatched = sorted(n for n in layers if actual.get(n) != ctx.policy.action(n).precision)
    record.precision = {
        "quantization": recovery.quantization,
        "mismatched_layers": mismatched,
        "int8_recovery": recovery.info,
    }
    macs, params = count_macs_params(ctx.model, ctx.input_shape)
    record.deployed.params, record.deployed.macs = params, macs
    record.deployed.size_bytes = (ctx.run_dir / "model.onnx").stat().st_size


def _check_not_slower(ctx: RunContext, record: RunRecord, pruned_fp32: Path) -> PrecisionCheck:
    """Measure the same pruned model in FP32 and in the policy's precisions, same runner.

    A searched policy falls back to FP32 when its precisions measure slower; a policy the user
    gave is shipped as given (and the report's gate says it is slower).
    """
    stage("measuring the pruned model in FP32 against the policy's precisions")
    sides = ctx.bench({"fp32": pruned_fp32, "policy": ctx.run_dir / "model.onnx"})
    fp32, mixed = Latency.from_bench(sides["fp32"]), Latency.from_bench(sides["policy"])
    statistic = ctx.profile.measure.statistic
    ratio = fp32.stat(statistic) / mixed.stat(statistic)
    searched = record.search is not None
    fallback = ratio < 1.0 and searched and Precision.FP32 in ctx.profile.precisions
    if fallback:
        _ship_fp32(ctx, pruned_fp32)
    return PrecisionCheck(
        fp32_ms=sides["fp32"]["latency_ms"],
        policy_ms=sides["policy"]["latency_ms"],
        speedup=ratio,
        not_slower=ratio >= 1.0,
        shipped="fp32" if fallback else "policy",
    )


def _ship_fp32(ctx: RunContext, pruned_fp32: Path) -> None:
    """model.onnx becomes the pruned model in FP32, and policy.json says so."""
    from pipeline.core.artifacts import atomic_copy

    stage("the policy's precisions measured slower than FP32 here: shipping FP32")
    atomic_copy(pruned_fp32, ctx.run_dir / "model.onnx")
    p = ctx.policy
    layers = {n: LayerAction(a.keep_ratio, Precision.FP32) for n, a in p.layers.items()}
    ctx.policy = Policy(layers, p.removed, p.channel_scores)
    ctx.policy.save(ctx.run_dir / "policy.json")
