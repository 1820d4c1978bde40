"""Validation of a deployed artifact, in the run and again later with `pipeline validate`.

Two comparisons, each through the profile's runner on the test split:
- fidelity: the deployed graph against the PyTorch model it was exported from (the pruned and
  fine-tuned model), with the tolerance of the loosest precision it uses. This catches broken
  export, quantization or runtime behaviour, as Polygraphy's comparator does.
- task: the deployed graph against the original model: accuracy of both, top-1 agreement, logit
  error, NaN/inf. Pruning changes the function on purpose, so here the gate is the accuracy drop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.core.artifacts import write_json
from pipeline.core.config import RunConfig
from pipeline.core.errors import ConfigError, ModelError
from pipeline.core.files import POLICY_MAX_BYTES, load_json
from pipeline.core.manifest import MANIFEST, RunManifest, load_manifest
from pipeline.core.policy import Policy, Precision
from pipeline.core.profile import Int8Scheme, TargetProfile
from pipeline.core.schema import parse_model
from pipeline.model.evaluate import batched_logits, stack, torch_logits

# The activation steps a quantization-aware fine-tune learned ({layer -> {input|output ->
# [scale, zero point]}}); present in a run directory only when QAT produced model.onnx.
QAT_SCALES = "qat_scales.json"


def onnx_logits(profile: TargetProfile, path: Path, inputs: np.ndarray) -> np.ndarray:
    """Logits of an artifact through the profile's runner, in the profile's batch size."""
    from pipeline.measure.runners import get_runner

    with get_runner(profile, path) as runner:
        return batched_logits(runner.infer, inputs, profile.input.batch)


def compare_deployed(
    profile: TargetProfile,
    deployed: np.ndarray,
    source: np.ndarray,
    original: np.ndarray,
    labels: np.ndarray,
    precisions: set[Precision],
) -> dict[str, Any]:
    """The validation record: task comparison fields at top level, fidelity nested.

    Fidelity is judged with the tolerance of the loosest precision the deployed graph uses
    (`tolerance_precision`: int8 over fp16 over fp32). `outputs` holds the statistics of each
    compared output (max / mean / median / p99 abs error, max rel error, top-1 agreement,
    NaN / inf counts) for both comparisons.
    """
    from exporters import compare_logits
    from exporters.onnx_export import OUTPUT_NAME

    loosest = loosest_precision(precisions)
    fidelity = compare_logits(source, deployed, labels, profile.tolerance_for({loosest}))
    task_cmp = compare_logits(original, deployed, labels, profile.tolerances.fp32)
    task = task_cmp.to_dict()
    drop = task["reference_accuracy"] - task["candidate_accuracy"]
    reasons = [f"fidelity: {r}" for r in fidelity.reasons]
    if task["nan_or_inf"]:
        reasons.append("the deployed model outputs NaN or inf")
    if drop > profile.max_accuracy_drop:
        reasons.append(f"accuracy drop {drop:.4f} > max_accuracy_drop {profile.max_accuracy_drop}")
    for key in ("passed", "reasons", "tolerance"):
        task.pop(key, None)
    return {
        "passed": not reasons,
        "reasons": reasons,
        **task,
        "accuracy_drop": drop,
        "precisions": sorted(p.value for p in precisions),
        "tolerance_precision": loosest.value,
        "fidelity": fidelity.to_dict(),
        "outputs": {
            OUTPUT_NAME: {"task": task_cmp.statistics(), "fidelity": fidelity.statistics()}
        },
        "samples": len(labels),
    }


def loosest_precision(precisions: set[Precision]) -> Precision:
    """The precision whose tolerance judges a graph mixing `precisions` (INT8 > FP16 > FP32)."""
    for p in (Precision.INT8, Precision.FP16, Precision.FP32):
        if p in precisions:
            return p
    return Precision.FP32


def _manifest(run_dir: Path) -> RunManifest:
    if not os.path.lexists(run_dir / MANIFEST):
        raise ConfigError(f"{run_dir} is not a run directory (no {MANIFEST})")
    manifest = load_manifest(run_dir, "cannot validate")
    for name in (
        "original.onnx",
        "model.onnx",
        "policy.json",
        "weights.safetensors",
        "pruning_history.json",
    ):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} has no {name}: the run did not finish; run it again")
    return manifest


def rebuild_pruned(run_dir: Path) -> nn.Module:
    """The deployed PyTorch model, from pruning_history.json and weights.safetensors (no pickle)."""
    from pipeline.model.models import build_model, load_weights
    from pipeline.model.prune import history_arch, load_history, remove_block, replay_history

    path = run_dir / "pruning_history.json"
    history = load_history(path)
    arch = history_arch(history, path)
    model = build_model(arch.model, arch.num_classes)
    for block in arch.removed:
        remove_block(model, block)
    replay_history(model, history["history"], arch.input_shape)
    load_weights(model, run_dir / "weights.safetensors")
    return model.eval()


def source_logits(
    model: nn.Module, inputs: np.ndarray, run_dir: Path, scheme: Int8Scheme
) -> np.ndarray:
    """Logits of the PyTorch model the deployed graph was exported from.

    When QAT produced the graph (the run directory holds `QAT_SCALES`), that model is the
    fake-quantized one with the learned steps: the float weights alone differ from the graph by
    design, and checking against them would fail a faithful export.
    """
    path = Path(run_dir) / QAT_SCALES
    if not path.is_file():
        return torch_logits(model, inputs)
    from pipeline.model.fake_quant import fake_quantized_logits

    scales = load_json(path, "QAT scales", ModelError, POLICY_MAX_BYTES)
    return fake_quantized_logits(model, scales, scheme, inputs)


TENSORRT_RUNTIMES = ("tensorrt", "onnxruntime-trt")


def add_tensorrt_rules(result: dict[str, Any], profile: TargetProfile, graph: Path) -> None:
    """For a TensorRT target, the graph checked against TensorRT's explicit-quantization rules
    (`exporters.trt_rules`): a graph that breaks one fails validation before it reaches the
    device. `result["tensorrt_qdq"]` lists the problems."""
    if profile.runtime not in TENSORRT_RUNTIMES:
        return
    from exporters.trt_rules import check_trt_qdq

    problems = check_trt_qdq(graph)
    result["tensorrt_qdq"] = problems
    if problems:
        result["passed"] = False
        result.setdefault("reasons", []).append(
            f"TensorRT Q/DQ rules: {len(problems)} problems, first: {problems[0]}"
        )


def validate_run(profile: TargetProfile, run_dir: Path) -> dict[str, Any]:
    """Re-run validation of a finished run and rewrite its validation.json."""
    from pipeline.model.data import load_data

    manifest = _manifest(run_dir)
    source = f"{run_dir}/{MANIFEST}"
    cfg = parse_model(RunConfig, manifest.config, source)
    ran_on = parse_model(TargetProfile, manifest.profile, source)
    inputs, labels = stack(load_data(cfg.data, ran_on.input.shape, seed=cfg.seed).test)
    policy = Policy.load(run_dir / "policy.json")
    result = compare_deployed(
        profile,
        deployed=onnx_logits(profile, run_dir / "model.onnx", inputs),
        source=source_logits(
            rebuild_pruned(run_dir),
            inputs,
            run_dir,
            ran_on.int8,
        ),
        original=onnx_logits(profile, run_dir / "original.onnx", inputs),
        labels=labels,
        precisions={a.precision for a in policy.layers.values()},
    )
    add_tensorrt_rules(result, profile, run_dir / "model.onnx")
    write_json(run_dir / "validation.json", result)
    return result
