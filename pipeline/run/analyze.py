"""`pipeline analyze`: where a model's latency goes and what each part of it tolerates.

For each prunable group (layers torch-pruning couples, which keep one channel count):
- its share of the model's latency, from ONNX Runtime's per-node profiler on the original graph
  (`pipeline.search.space.latency_shares`, the same figure agents see), each kernel charged to
  the layer it belongs to, with the elementwise nodes fused into it. The profiler is used rather
  than "the latency saved when the group alone is pruned" because that figure mixes the group
  with its consumers (whose input channels shrink too) and cannot reach zero (a group keeps at
  least `min_keep_ratio`); what pruning buys is reported beside it, as the measured latency of
  each pruned candidate. The profiler runs ONNX Runtime on this machine's CPU, so the share is
  given for local `onnxruntime-cpu` targets only;
- the candidate score (validation accuracy after the search's short distilled fine-tune, by the
  search's own candidate evaluator) and measured latency with that group alone pruned, at each
  keep ratio;
and for each layer, the validation accuracy with that layer alone in INT8 (everything else
FP32). Accuracy changes are paired with the original on the same validation images, with
their exact 95% intervals (`pipeline.core.stats.paired_difference`).
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import RunConfig, SearchConfig
from pipeline.core.policy import LayerAction, Policy, Precision
from pipeline.core.profile import TargetProfile, with_input_shape
from pipeline.core.space import CandidateResult, SearchSpace
from pipeline.core.stats import correct_of, paired_difference
from pipeline.run.analysis import (
    Analysis,
    GroupRow,
    LayerRow,
    Trial,
    print_analysis,
    write_analysis,
)
from pipeline.run.context import RunContext, console, stage

# `pipeline analyze` options that are run config fields of the same name
CONFIG_OPTIONS = ("model", "weights", "data", "num_classes", "seed")
# The search settings an analysis reads: those of its candidates (the rest choose a policy)
SEARCH_FIELDS_READ = ("candidate_steps", "candidate_bn_batches", "timeout_s")


def analyze_command(given: dict[str, Any]) -> None:
    """`pipeline analyze` with its options by name: the run config as `pipeline run` reads it
    (its model and data options, a --config file), the analysis, its tables.

    Raises:
        PipelineError: Bad input, before any work.
    """
    from pipeline.core.artifacts import utc_stamp
    from pipeline.core.config import load_config
    from pipeline.core.profile import load_profile, parse_shape

    profile = load_profile(given["target"])
    ratios = parse_keep_ratios(given["keep_ratios"])
    overrides: dict[str, Any] = {k: given[k] for k in CONFIG_OPTIONS}
    overrides["random_init"] = True if given["random_init"] else None
    overrides["show_progress"] = None if given["progress"] else False
    overrides["input_shape"] = parse_shape(given["input_shape"]) if given["input_shape"] else None
    sections = {"search": {"candidate_steps": given["candidate_steps"]}}
    config = load_config(given["config"], overrides, sections)
    refuse_search_settings(config, given["config"])
    out = given["out"] or Path("runs") / f"analyze-{_file_name(profile.name)}-{utc_stamp()}"
    result = analyze(profile, config, ratios, Path(out))
    print_analysis(console, result, Path(out))


def refuse_search_settings(config: RunConfig, path: Path | None) -> None:
    """A --config that chooses a policy (policy, budget, floor, agent...) would be silently
    ignored by an analysis, which tries every group alone: refuse it, naming the settings.

    Raises:
        ConfigError: The config sets a field an analysis does not read.
    """
    from pipeline.core.errors import ConfigError

    default, search = RunConfig(), SearchConfig()
    ignored = [f for f in ("policy", "budget_ms", "max_accuracy_drop", "out")
               if getattr(config, f) != getattr(default, f)]  # fmt: skip
    ignored += [
        f"search.{f}"
        for f in type(search).model_fields
        if f not in SEARCH_FIELDS_READ and getattr(config.search, f) != getattr(search, f)
    ]
    if ignored:
        raise ConfigError(
            f"{path}: pipeline analyze does not search or write a run, so it would ignore "
            f"{', '.join(ignored)}; remove them or pass a config without them"
        )


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "target"


def parse_keep_ratios(text: str) -> tuple[float, ...]:
    """'0.25,0.5' -> (0.25, 0.5): distinct ratios in (0, 1); else a one-line ConfigError."""
    from pipeline.core.errors import ConfigError

    try:
        ratios = [float(p) for p in text.split(",")]
    except ValueError:
        ratios = []
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios) or len(ratios) > 10:
        raise ConfigError(
            f"--keep-ratios {text!r}: give up to 10 keep ratios between 0 and 1 (exclusive), "
            "separated by commas, e.g. 0.25,0.5,0.75"
        )
    return tuple(dict.fromkeys(ratios))


def analyze(
    profile: TargetProfile,
    config: RunConfig,
    keep_ratios: tuple[float, ...],
    out: Path,
) -> Analysis:
    """Load the model and data as `pipeline run` does, analyse them and write `out`.

    Raises:
        PipelineError: Bad input (profile, model, data), before any measurement.
    """
    from pipeline.core.artifacts import check_out_dir
    from pipeline.run import stages

    profile = with_input_shape(profile, config.input_shape)
    ctx = RunContext(profile, config, out)
    check_out_dir(out)  # before loading and training anything
    stages.load_inputs(ctx)  # bad input fails here, before the output folder exists
    _make_folder(out)
    result = _measure(ctx, keep_ratios)
    write_analysis(result, out)
    return result


def _make_folder(out: Path) -> None:
    from pipeline.core.errors import ConfigError

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {out}: {exc.strerror}") from None


def _measure(ctx: RunContext, keep_ratios: tuple[float, ...]) -> Analysis:
    import time

    from exporters import export_onnx
    from pipeline.model.evaluate import torch_logits
    from pipeline.run.search_stage import candidate_spec
    from pipeline.search.build import build_evaluator

    started = time.time()
    stage("measuring the original on the target and profiling its layers")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(ctx.original, ctx.input_shape, Path(tmp) / "original.onnx")
        # No latency model: every candidate of an analysis is measured, none predicted
        evaluator = build_evaluator(
            ctx.original,
            ctx.splits,
            ctx.profile,
            onnx_path,
            candidate_spec(ctx),
            None,
            timeout_s=ctx.config.search.timeout_s,
            latency_model=False,
            opset=ctx.config.opset,
        )
    try:
        evaluator.keep_val_correct = True
        reference = correct_of(
            torch_logits(ctx.original, evaluator.val_inputs), evaluator.val_labels
        )
        result = _trials(ctx, evaluator.space, evaluator.evaluate, reference, keep_ratios)
    finally:
        evaluator.close()
    result.wall_s = round(time.time() - started, 1)
    return result


Job = tuple[str, Policy, Callable[[Trial], None]]
"""What the progress line shows, the policy to evaluate, and where its trial goes."""


def _trials(
    ctx: RunContext,
    space: SearchSpace,
    evaluate: Callable[[Policy], CandidateResult],
    reference: np.ndarray,
    keep_ratios: tuple[float, ...],
) -> Analysis:
    """Evaluate every group pruned alone at each keep ratio, then every layer alone in INT8."""
    profile = ctx.profile
    groups = _group_rows(space, profile, keep_ratios)
    layers = _layer_rows(space, profile)
    int8 = Precision.INT8 in profile.precisions
    jobs = _pruning_jobs(groups, keep_ratios) + (_int8_jobs(layers) if int8 else [])
    stage(
        f"analysing {len(groups)} groups at keep ratios {', '.join(map(str, keep_ratios))}"
        + (f" and {len(layers)} layers in INT8" if int8 else " (the target allows no INT8)")
        + f": {len(jobs)} candidates"
    )
    with _progress(ctx.config.show_progress) as progress:
        task = progress.add_task("analyze", total=len(jobs), what="")
        for what, policy, put in jobs:
            progress.update(task, what=what)
            put(_trial(evaluate(policy), reference))
            progress.advance(task)
    return Analysis(
        profile=profile,
        keep_ratios=keep_ratios,
        original_accuracy=space.original_accuracy,
        original_latency_ms=space.original_latency_ms,
        val_images=len(reference),
        groups=groups,
        layers=layers,
        int8_allowed=int8,
        precision_latency_ms=dict(space.precision_latency_ms),
    )


def _shares_known(profile: TargetProfile) -> bool:
    """The profiler's shares describe the target only when the target is this machine's
    ONNX Runtime CPU (see the module's docstring)."""
    return profile.runtime == "onnxruntime-cpu" and profile.device == "local"


def _group_rows(
    space: SearchSpace, profile: TargetProfile, keep_ratios: tuple[float, ...]
) -> list[GroupRow]:
    from pipeline.model.prune import channels_to_keep

    members: dict[str, list] = {}
    for layer in space.prunable:
        members.setdefault(layer.group, []).append(layer)
    rows = []
    for group, layers in members.items():
        channels = layers[0].out_channels
        share = sum(x.latency_share for x in layers) if _shares_known(profile) else None
        rows.append(
            GroupRow(
                group=group,
                layers=tuple(x.name for x in layers),
                channels=channels,
                params=sum(x.params for x in layers),
                macs=sum(x.macs for x in layers),
                latency_share=share,
                kept={
                    r: channels_to_keep(
                        channels, r, profile.channel_multiple, profile.min_keep_ratio
                    )
                    for r in keep_ratios
                },
            )
        )
    return rows


def _layer_rows(space: SearchSpace, profile: TargetProfile) -> list[LayerRow]:
    known = _shares_known(profile)
    return [
        LayerRow(
            layer=x.name,
            group=x.group if x.prunable else None,
            kind=x.kind,
            latency_share=x.latency_share if known else None,
        )
        for x in space.layers
    ]


def _pruning_jobs(groups: list[GroupRow], keep_ratios: tuple[float, ...]) -> list[Job]:
    jobs: list[Job] = []
    for row in groups:
        for r in keep_ratios:
            policy = Policy({name: LayerAction(r, Precision.FP32) for name in row.layers})
            jobs.append((f"{row.group} keep {r:g}", policy, functools.partial(_put, row.pruned, r)))
    return jobs


def _int8_jobs(layers: list[LayerRow]) -> list[Job]:
    return [
        (
            f"{row.layer} int8",
            Policy({row.layer: LayerAction(1.0, Precision.INT8)}),
            functools.partial(setattr, row, "int8"),
        )
        for row in layers
    ]


def _put(trials: dict[float, Trial], ratio: float, trial: Trial) -> None:
    trials[ratio] = trial


def _trial(result: CandidateResult, reference: np.ndarray) -> Trial:
    """A candidate's figures; a failed one is data (its error), not the end of the analysis."""
    if not result.ok:
        return Trial(None, None, None, result.error)
    correct = result.extra.get("val_correct")
    change = paired_difference(correct, reference) if correct is not None else None
    return Trial(result.accuracy, change, result.latency_ms)


def _progress(show: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]analyze"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[what]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
    )
