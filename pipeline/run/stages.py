"""The run's stages, in order. Each reads the context, writes its artifacts into the run
directory and its findings into the `RunRecord`; `pipeline.run.plan.execute` walks them.

load -> baseline -> search (no fixed policy) -> compress (prune + recovery fine-tune) ->
export (precisions in the graph, `export_stage`) -> no runtime (a local TensorRT target that
cannot run here: stop once model.onnx is checked against its Q/DQ rules) -> floor (the
accuracy-floor objective, `floor_stage`) -> engine (local TensorRT) -> measure -> validate ->
baselines (searched runs) -> report. A stage that fails raises; files already written are
complete (atomic) and `manifest.json` says the run did not finish.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.core.artifacts import write_json
from pipeline.core.errors import RuntimeNotAvailable
from pipeline.core.policy import check_policy, parse_policy_arg
from pipeline.core.records import Latency, ModelFigures, RunRecord
from pipeline.core.stats import correct_of
from pipeline.model.data import load_data
from pipeline.model.evaluate import accuracy, stack, torch_logits
from pipeline.model.models import build_model, check_input, load_weights, save_safetensors
from pipeline.model.prune import count_macs_params, save_history
from pipeline.run.context import RunContext, TestSet, console, stage
from pipeline.search.materialize import Recovery, materialize, recover

log = logging.getLogger(__name__)


# Training batches that estimate an untrained model's BatchNorm statistics
RANDOM_INIT_BN_BATCHES = 8


def load_inputs(ctx: RunContext) -> None:
    """Data splits, the original model (the demo's when none is given) and the policy."""
    _check_target(ctx)
    cfg = ctx.config
    stage("loading data")
    ctx.splits = load_data(cfg.data, ctx.input_shape, seed=cfg.seed)
    ctx.original, ctx.model_info = _load_model(ctx)
    check_input(ctx.original, ctx.input_shape)  # before any forward pass of ours
    if cfg.random_init:
        _batchnorm_from_data(ctx.original, ctx)
        ctx.model_info["batchnorm"] = "statistics estimated on the training split (random init)"
    if cfg.policy is not None:
        ctx.policy = parse_policy_arg(cfg.policy, ctx.original, ctx.profile.default_precision)
        check_policy(ctx.policy, ctx.original, ctx.profile.precisions)
    else:
        from agents import agent_class

        agent_class(cfg.search.agent)  # an unknown agent is bad input: fail before any work


def _check_target(ctx: RunContext) -> None:
    """Fail fast, before any training, on a target we cannot use. A local TensorRT target with a
    fixed policy needs no measurement to export: that run goes on, writes model.onnx and checks
    it against TensorRT's rules (`stop_without_runtime`), for the device to build and time."""
    from pipeline.measure.runners import check_runtime
    from pipeline.run.validate import TENSORRT_RUNTIMES

    try:
        check_runtime(ctx.profile)
    except RuntimeNotAvailable as exc:
        local_trt = ctx.profile.runtime in TENSORRT_RUNTIMES and ctx.profile.device == "local"
        if not local_trt or ctx.config.policy is None:
            raise
        ctx.runtime_missing = exc.reason


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


def _batchnorm_from_data(model: nn.Module, ctx: RunContext) -> None:
    # Untrained BatchNorm statistics (mean 0, variance 1) describe no data: through a deep
    # network (ResNet-101, Inception v3) activations then grow block by block until the logits
    # overflow. Estimate them from training batches, as the first steps of any training would.
    from pipeline.model.finetune import recalibrate_batchnorm

    assert ctx.splits is not None
    cfg = ctx.config
    recalibrate_batchnorm(
        model, ctx.splits.train, RANDOM_INIT_BN_BATCHES, cfg.finetune.batch_size, cfg.seed
    )


def baseline(ctx: RunContext, record: RunRecord) -> None:
    """Export the original model and evaluate it on the test split."""
    from exporters import export_onnx

    stage("exporting original.onnx")
    path = ctx.run_dir / "original.onnx"
    export_onnx(ctx.original, ctx.input_shape, path, ctx.config.opset)
    inputs, labels = stack(ctx.splits.test)
    logits = torch_logits(ctx.original, inputs)
    ctx.test = TestSet(inputs, labels, logits)
    macs, params = count_macs_params(ctx.original, ctx.input_shape)
    record.original = ModelFigures(
        accuracy=accuracy(logits, labels),
        correct=correct_of(logits, labels),  # the report's paired intervals compare these
        params=params,
        macs=macs,
        size_bytes=path.stat().st_size,
    )


def search(ctx: RunContext, record: RunRecord) -> str | None:
    """Search a policy on the target; stops the run when nothing meets the budget."""
    from pipeline.run import report
    from pipeline.run.search_stage import search_policy

    ctx.policy = search_policy(ctx, record)
    if ctx.policy is None:
        infeasible = record.search.summary.get("infeasible") if record.search else None
        report.write_no_candidate(ctx, record, infeasible)
        return "failed: infeasible budget" if infeasible else "failed: no candidate met the budget"
    ctx.policy.save(ctx.run_dir / "policy.json")
    return None


def compress(ctx: RunContext, record: RunRecord) -> None:
    """Prune a copy of the original by the policy, then recover it (with distillation)."""
    ft = ctx.config.finetune
    stage("pruning with torch-pruning")
    result = materialize(ctx.original, ctx.policy, ctx.profile)
    arch = {
        "model": ctx.config.model or ctx.model_info["arch"],
        "num_classes": ctx.splits.num_classes,
        "input_shape": list(ctx.input_shape),
        "removed": list(ctx.policy.removed),
    }
    save_history(ctx.run_dir / "pruning_history.json", result.history, arch)
    record.channels = {n: list(c) for n, c in result.channels.items()}
    if result.unchanged:  # the policy only sets precisions: the original needs no recovery
        stage("nothing pruned: no recovery fine-tune")
    else:
        stage(f"recovery fine-tune: {ft.steps} steps, distillation weight {ft.kd_weight}")
        teacher = ctx.original if ft.kd_weight > 0 else None
        spec = ft.spec(ctx.config.seed)
        recover(
            result.model,
            Recovery(spec, ctx.splits.train, teacher, "recovery", ctx.config.show_progress),
        )
    save_safetensors(result.model, ctx.run_dir / "weights.safetensors")
    ctx.model = result.model


def stop_without_runtime(ctx: RunContext, record: RunRecord) -> str | None:
    """Where TensorRT cannot run, stop once model.onnx is written: check it against TensorRT's
    Q/DQ rules, write `tensorrt.json` (the problems, the trtexec commands that build and time it
    on the device), then stop in one line, or fail the run if the graph breaks a rule."""
    from exporters.trt_rules import check_trt_qdq
    from exporters.trtexec import trtexec_commands

    graph = ctx.run_dir / "model.onnx"
    stage("checking model.onnx against TensorRT's Q/DQ rules")
    problems = check_trt_qdq(graph)
    commands = trtexec_commands(graph, ctx.profile)
    notes = {"runtime_missing": ctx.runtime_missing, "tensorrt_qdq": problems, "trtexec": commands}
    write_json(ctx.run_dir / "tensorrt.json", notes)
    if problems:
        console.print(f"model.onnx breaks TensorRT's Q/DQ rules ({len(problems)}): {problems[0]}")
        return "failed: TensorRT Q/DQ rules"
    raise RuntimeNotAvailable(
        f"runtime '{ctx.profile.runtime}' (profile '{ctx.profile.name}') is not available on "
        f"this machine: {ctx.runtime_missing}; {graph} is written and passes TensorRT's Q/DQ "
        "rules: build and time it on the device with the trtexec commands in tensorrt.json "
        "beside it"
    )


def build_engine(ctx: RunContext, record: RunRecord) -> None:
    """On a local TensorRT target, build model.engine (and its metadata) on this GPU: an engine
    only runs on the GPU model and TensorRT version that built it."""
    from exporters.tensorrt import build_engine as build

    stage("building model.engine with TensorRT on this GPU")
    record.engine = build(ctx.run_dir / "model.onnx", ctx.profile, ctx.run_dir / "model.engine")


def measure(ctx: RunContext, record: RunRecord) -> None:
    """Latency of original.onnx and model.onnx on the target, same runner and settings."""
    rounds = ctx.profile.measure.rounds
    stage(f"measuring latency on {ctx.profile.name} ({ctx.profile.runtime}), {rounds} rounds")
    names = {"original": "original.onnx", "deployed": "model.onnx"}
    sides = _quiet_session(ctx, {key: ctx.run_dir / name for key, name in names.items()})
    record.original.latency = Latency.from_bench(sides["original"])
    record.deployed.latency = Latency.from_bench(sides["deployed"])
    batches = ctx.profile.measure.report_batches
    if batches:
        stage(f"measuring latency at batch {', '.join(map(str, batches))}, {rounds} rounds")
        record.batches = ctx.bench_batches({k: ctx.run_dir / n for k, n in names.items()})


# Sessions of the final comparison measured again while one side reads noisy (cv over the
# profile's `measure.max_cv`): on a shared 2-core CPU a demo's gate session read the deployed
# model at cv 0.35 and 1.2x its latency in the baselines' session minutes later
NOISY_RETRIES = 2


def _quiet_session(ctx: RunContext, graphs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """`ctx.bench` of `graphs`, measured again (at most `NOISY_RETRIES` times) while a side
    reads noisy; the session whose noisiest side is the least noisy is kept."""
    sessions = [ctx.bench(graphs)]
    while any(s["noisy"] for s in sessions[-1].values()) and len(sessions) <= NOISY_RETRIES:
        worst = max(s["latency_ms"]["cv"] for s in sessions[-1].values())
        stage(f"the session read noisy (cv {worst:.2f}): measuring again")
        sessions.append(ctx.bench(graphs))
    return min(sessions, key=lambda s: max(side["latency_ms"]["cv"] for side in s.values()))


def validate(ctx: RunContext, record: RunRecord) -> None:
    """Compare model.onnx with the model it came from and with the original, on test."""
    from pipeline.run.validate import (
        add_tensorrt_rules,
        compare_deployed,
        onnx_logits,
        source_logits,
    )

    stage("validating model.onnx against the original")
    test = ctx.test
    deployed = onnx_logits(ctx.profile, ctx.run_dir / "model.onnx", test.inputs)
    result = compare_deployed(
        ctx.profile,
        deployed,
        source_logits(ctx.model, test.inputs, ctx.run_dir, ctx.profile.int8),
        test.original_logits,
        test.labels,
        {a.precision for a in ctx.policy.layers.values()},
    )
    add_tensorrt_rules(result, ctx.profile, ctx.run_dir / "model.onnx")
    write_json(ctx.run_dir / "validation.json", result)
    record.validation = result
    record.deployed.accuracy = result["candidate_accuracy"]
    record.deployed.correct = correct_of(deployed, test.labels)


def baselines(ctx: RunContext, record: RunRecord) -> None:
    from pipeline.run.baselines import run_baselines

    run_baselines(ctx, record)


def write_report(ctx: RunContext, record: RunRecord) -> None:
    from pipeline.run import report

    record.report = report.write_report(ctx, record)
