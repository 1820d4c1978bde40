"""The orchestrator: one function per stage, each stage writes its artifact into the run dir.

Stages: load -> baseline -> compress (prune + recovery fine-tune) -> export -> measure ->
validate -> report. A stage that fails raises; files already written are complete (atomic) and
`manifest.json` says the run did not finish.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.core.artifacts import new_run_dir, write_json
from pipeline.core.config import RunConfig
from pipeline.core.policy import Policy, Precision, check_policy, parse_policy_arg, policy_layers
from pipeline.core.profile import TargetProfile
from pipeline.core.stats import correct_of
from pipeline.model.data import load_data
from pipeline.model.evaluate import accuracy, stack, torch_logits
from pipeline.model.finetune import train
from pipeline.model.models import build_model, check_input, load_weights, save_safetensors
from pipeline.model.prune import count_macs_params, prune_model, save_history
from pipeline.run import report
from pipeline.run.context import RunContext, console, stage

log = logging.getLogger(__name__)


def load_inputs(ctx: RunContext) -> None:
    """Data splits, the original model (the demo's when none is given) and the policy."""
    from pipeline.measure.runners import check_runtime

    check_runtime(ctx.profile)  # fail fast, before any training, on a target we cannot use
    cfg = ctx.config
    stage("loading data")
    ctx.splits = load_data(cfg.data, ctx.input_shape, seed=cfg.seed)
    ctx.original, ctx.model_info = _load_model(ctx)
    check_input(ctx.original, ctx.input_shape)
    if cfg.policy is not None:
        ctx.policy = parse_policy_arg(cfg.policy, ctx.original, ctx.profile.default_precision)
        check_policy(ctx.policy, ctx.original, ctx.profile.precisions)
    else:
        from agents import agent_class

        agent_class(cfg.search.agent)  # an unknown agent is bad input: fail before any work


def _load_model(ctx: RunContext) -> tuple[nn.Module, dict[str, Any]]:
    cfg, splits = ctx.config, ctx.splits
    assert splits is not None
    if cfg.model is None:
        from pipeline.model.demo import demo_model

        stage(f"demo: training (or loading the cached) resnet18 baseline on {cfg.data or 'digits'}")
        return demo_model(splits, show_progress=cfg.show_progress)
    model = build_model(cfg.model, cfg.num_classes or splits.num_classes)
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    info = {"arch": cfg.model, "weights": str(cfg.weights) if cfg.weights else None}
    return model.eval(), info


def baseline(ctx: RunContext) -> None:
    """Export the original model and evaluate it on the test split."""
    from exporters import export_onnx

    stage("exporting original.onnx")
    export_onnx(ctx.original, ctx.input_shape, ctx.run_dir / "original.onnx", ctx.config.opset)
    inputs, labels = stack(ctx.splits.test)
    logits = torch_logits(ctx.original, inputs)
    macs, params = count_macs_params(ctx.original, ctx.input_shape)
    ctx.results["original"] = {
        "accuracy": accuracy(logits, labels),
        "params": params,
        "macs": macs,
        "size_bytes": (ctx.run_dir / "original.onnx").stat().st_size,
    }
    ctx.results["_test"] = (inputs, labels, logits)
    # Per-image correctness on test: the paired intervals of the report compare these
    ctx.results["test_correct"] = {"original": correct_of(logits, labels)}


def compress(ctx: RunContext) -> nn.Module:
    """Prune a copy of the original by the policy, then recover it (with distillation)."""
    stage("pruning with torch-pruning")
    pruned = copy.deepcopy(ctx.original)
    p = ctx.profile
    result = prune_model(pruned, ctx.policy, ctx.input_shape, p.channel_multiple, p.min_keep_ratio)
    arch = {
        "model": ctx.config.model or ctx.model_info["arch"],
        "num_classes": ctx.splits.num_classes,
        "input_shape": list(ctx.input_shape),
        "removed": list(ctx.policy.removed),
    }
    save_history(ctx.run_dir / "pruning_history.json", result.history, arch)
    ctx.results["channels"] = {n: list(c) for n, c in result.channels.items()}
    ft = ctx.config.finetune
    if result.unchanged:  # the policy only sets precisions: the original needs no recovery
        stage("nothing pruned: no recovery fine-tune")
    else:
        stage(f"recovery fine-tune: {ft.steps} steps, distillation weight {ft.kd_weight}")
        teacher = ctx.original if ft.kd_weight > 0 else None
        train(
            pruned,
            ctx.splits.train,
            ft.spec(ctx.config.seed),
            teacher,
            "recovery",
            ctx.config.show_progress,
        )
    save_safetensors(pruned, ctx.run_dir / "weights.safetensors")
    return pruned


def export_deployed(ctx: RunContext, pruned: nn.Module) -> nn.Module:
    """Write model.onnx with the policy's precisions inside the graph; check they took.

    INT8 that loses too much accuracy after calibration is recovered with a quantization-aware
    fine-tune (`finetune.qat`); the model returned is the one model.onnx holds.
    """
    from exporters import layer_precisions
    from pipeline.search.int8_recovery import recover_int8

    stage("exporting model.onnx with the policy's precisions")
    layers = policy_layers(pruned)  # removed blocks' layers are gone
    ft = ctx.config.finetune
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "pruned_fp32.onnx"
        recovery = recover_int8(
            pruned,
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
            pruned = recovery.model
            save_safetensors(pruned, ctx.run_dir / "weights.safetensors")
        quant = recovery.quantization
        precisions = {n: ctx.policy.action(n).precision for n in layers}
        if set(precisions.values()) != {Precision.FP32}:
            check = _precision_check(ctx, fp32)
            ctx.results["precision_check"] = check
            if not check["not_slower"] and _may_ship_fp32(ctx):
                _ship_fp32(ctx, fp32)
                check["shipped"] = "fp32"
    if recovery.qparams and ctx.results.get("precision_check", {}).get("shipped") != "fp32":
        from pipeline.run.validate import QAT_SCALES

        write_json(ctx.run_dir / QAT_SCALES, recovery.qparams)  # validation's reference
    actual = layer_precisions(ctx.run_dir / "model.onnx", layers)
    wanted = {n: ctx.policy.action(n).precision for n in layers}
    mismatched = sorted(n for n in layers if actual.get(n) != wanted[n])
    ctx.results["precision"] = {
        "quantization": quant,
        "mismatched_layers": mismatched,
        "int8_recovery": recovery.info,
    }
    macs, params = count_macs_params(pruned, ctx.input_shape)
    ctx.results["deployed_static"] = {
        "params": params,
        "macs": macs,
        "size_bytes": (ctx.run_dir / "model.onnx").stat().st_size,
    }
    return pruned


def _precision_check(ctx: RunContext, pruned_fp32: Path) -> dict[str, Any]:
    """Measure the same pruned model in FP32 and in the policy's precisions, same runner."""
    stage("measuring the pruned model in FP32 against the policy's precisions")
    sides = ctx.bench({"fp32": pruned_fp32, "policy": ctx.run_dir / "model.onnx"})
    fp32, mixed = sides["fp32"], sides["policy"]
    statistic = ctx.profile.measure.statistic
    ratio = fp32["latency_ms"][statistic] / mixed["latency_ms"][statistic]
    return {
        "fp32_ms": fp32["latency_ms"],
        "policy_ms": mixed["latency_ms"],
        "speedup": ratio,
        "not_slower": ratio >= 1.0,
        "shipped": "policy",
    }


def _may_ship_fp32(ctx: RunContext) -> bool:
    """A searched policy falls back to FP32 when its precisions measure slower; a policy the
    user gave is shipped as given (and the report's gate says it is slower)."""
    return bool(ctx.results.get("search")) and Precision.FP32 in ctx.profile.precisions


def _ship_fp32(ctx: RunContext, pruned_fp32: Path) -> None:
    """model.onnx becomes the pruned model in FP32, and policy.json says so."""
    from pipeline.core.artifacts import atomic_copy
    from pipeline.core.policy import LayerAction

    stage("the policy's precisions measured slower than FP32 here: shipping FP32")
    atomic_copy(pruned_fp32, ctx.run_dir / "model.onnx")
    p = ctx.policy
    layers = {n: LayerAction(a.keep_ratio, Precision.FP32) for n, a in p.layers.items()}
    ctx.policy = Policy(layers, p.removed, p.channel_scores)
    ctx.policy.save(ctx.run_dir / "policy.json")


def build_engine_stage(ctx: RunContext) -> None:
    """On a local TensorRT target, build model.engine (and its metadata) on this GPU: an engine
    only runs on the GPU model and TensorRT version that built it."""
    if ctx.profile.runtime != "tensorrt" or ctx.profile.device != "local":
        return
    from exporters.tensorrt import build_engine

    stage("building model.engine with TensorRT on this GPU")
    ctx.results["engine"] = build_engine(
        ctx.run_dir / "model.onnx", ctx.profile, ctx.run_dir / "model.engine"
    )


def measure(ctx: RunContext) -> None:
    """Latency of original.onnx and model.onnx on the target, same runner and settings."""
    rounds = ctx.profile.measure.rounds
    stage(f"measuring latency on {ctx.profile.name} ({ctx.profile.runtime}), {rounds} rounds")
    names = {"original": "original.onnx", "deployed": "model.onnx"}
    sides = ctx.bench({key: ctx.run_dir / name for key, name in names.items()})
    for key, bench in sides.items():
        ctx.results.setdefault(key, {})["latency_ms"] = bench["latency_ms"]
        ctx.results[key]["rounds_ms"] = bench["rounds_ms"]
        ctx.results[key]["floor"] = {k: bench.get(k) for k in ("floor_ms", "floor_ratio")}
        ctx.results[key]["noisy"] = bench.get("noisy", False)


def validate(ctx: RunContext, pruned: nn.Module) -> dict[str, Any]:
    """Compare model.onnx with the model it came from and with the original, on test."""
    from pipeline.run.validate import compare_deployed, onnx_logits, source_logits

    stage("validating model.onnx against the original")
    inputs, labels, original = ctx.results["_test"]
    deployed = onnx_logits(ctx.profile, ctx.run_dir / "model.onnx", inputs)
    result = compare_deployed(
        ctx.profile,
        deployed,
        source_logits(pruned, inputs, ctx.run_dir, ctx.profile.int8),
        original,
        labels,
        {a.precision for a in ctx.policy.layers.values()},
    )
    write_json(ctx.run_dir / "validation.json", result)
    ctx.results.setdefault("deployed", {})["accuracy"] = result["candidate_accuracy"]
    ctx.results["test_correct"]["deployed"] = correct_of(deployed, labels)
    return result


def search(ctx: RunContext, resume: bool) -> bool:
    """Search a policy on the target; False when nothing meets the budget (and none may ship)."""
    from pipeline.run.search_stage import search_policy

    ctx.policy = search_policy(ctx, resume)
    if ctx.policy is None:
        return False
    ctx.policy.save(ctx.run_dir / "policy.json")
    return True


def execute(
    profile: TargetProfile, config: RunConfig, run_dir: Path | None = None, resume: bool = False
) -> int:
    """Run every stage; return the exit code (0 deployable, 1 a gate failed)."""
    ctx = RunContext(profile, config, Path())
    load_inputs(ctx)  # bad input fails here, before a run directory exists
    ctx.run_dir = run_dir or new_run_dir(config.out, profile.name)
    console.print(f"run directory: [bold]{ctx.run_dir}[/]")
    if ctx.policy is not None:
        ctx.policy.save(ctx.run_dir / "policy.json")
    report.write_manifest(ctx, status="running")
    try:
        baseline(ctx)
        if ctx.policy is None and not search(ctx, resume):
            report.write_no_candidate(ctx)
            report.write_manifest(ctx, status="failed: no candidate met the budget")
            return 1
        pruned = compress(ctx)
        pruned = export_deployed(ctx, pruned)
        build_engine_stage(ctx)
        measure(ctx)
        comparison = validate(ctx, pruned)
        if ctx.results.get("search") and config.search.baselines:
            from pipeline.run.baselines import run_baselines

            run_baselines(ctx)
        summary = report.write_report(ctx, comparison)
    except BaseException:
        report.write_manifest(ctx, status="failed")
        raise
    finally:
        if ctx.measurer is not None:
            ctx.measurer.close()
    report.write_manifest(ctx, status="complete")
    report.print_summary(console, summary)
    return 0 if summary["gates"]["passed"] else 1
