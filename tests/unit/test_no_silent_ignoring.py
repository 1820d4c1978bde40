"""Nothing the user gives is silently ignored: options that do not apply are errors that say
why, unknown policy versions are refused, a torchvision model needs weights unless random
initialisation is asked for, and a run whose original scores at chance is never deployable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_main import main_in_process

from pipeline.core.config import RunConfig, load_config
from pipeline.core.errors import ConfigError, PolicyError
from pipeline.core.policy import Policy
from pipeline.core.records import ModelFigures, RunRecord
from pipeline.core.stats import correct_of
from pipeline.model.evaluate import stack, torch_logits
from pipeline.run import context as run_context
from pipeline.run.context import RunContext
from pipeline.run.report import _gates


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--weights", "missing.safetensors"), "weights is given without model"),
        (("--num-classes", "7"), "num_classes is given without model"),
        (("--random-init",), "random_init is given without model"),
        (("--model", "resnet18"), "has no --weights"),
        (("--model", "resnet18", "--random-init", "--weights", "w.pt"), "both given"),
        (("--policy", "uniform:0.5", "--agent", "dqn"), "--agent does not apply with --policy"),
        (("--policy", "uniform:0.5", "--episodes", "3"), "--episodes does not apply"),
        (("--policy", "uniform:0.5", "--allow-over-budget"), "--allow-over-budget does not"),
        (("--resume", "somewhere", "--seed", "3"), "--seed does not apply with --resume"),
        (("--resume", "somewhere", "--model", "resnet18"), "--model does not apply"),
    ],
)
def test_options_that_would_be_ignored_are_errors(tmp_path, monkeypatch, args, named) -> None:
    monkeypatch.chdir(tmp_path)
    result = main_in_process("run", "--target", "cpu", "--no-progress", *args)
    assert result.code == 2 and result.one_line_error, result
    assert named in result.err, result.err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("policy: uniform:0.5\n", "policy"),
        ("budget_ms: 2.0\nsearch:\n  agent: dqn\n", "budget_ms, search.agent"),
        ("max_accuracy_drop: 1.0\n", "max_accuracy_drop"),
    ],
)
def test_analyze_refuses_a_config_that_chooses_a_policy(tmp_path, monkeypatch, yaml_text, named):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipeline.yaml").write_text(yaml_text)
    result = main_in_process(
        "analyze", "--target", "cpu", "--config", "pipeline.yaml", "--no-progress"
    )
    assert result.code == 2 and result.one_line_error, result
    assert f"would ignore {named}" in result.err, result.err
    assert not (tmp_path / "runs").exists()


def test_analyze_reads_the_candidate_settings_of_a_config(tmp_path) -> None:
    from pipeline.run.analyze import refuse_search_settings

    path = tmp_path / "pipeline.yaml"
    path.write_text("seed: 3\nsearch:\n  candidate_steps: 5\n  timeout_s: 60\n")
    refuse_search_settings(load_config(path, {}), path)  # nothing ignored: no error


def test_a_config_file_is_held_to_the_same_combinations(tmp_path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("weights: w.safetensors\n")
    with pytest.raises(ConfigError, match="weights is given without model"):
        load_config(path, {})
    path.write_text("model: efficientnet_b0\n")
    with pytest.raises(ConfigError, match="--random-init"):
        load_config(path, {})
    path.write_text("model: efficientnet_b0\nrandom_init: true\n")
    assert load_config(path, {}).random_init
    # A module:function may load its own weights: it is not refused (the chance gate judges it)
    path.write_text("model: conftest:make_tiny_resnet\n")
    assert load_config(path, {}).model == "conftest:make_tiny_resnet"


@pytest.mark.parametrize("version", [2, 0, "1", None, True])
def test_a_policy_of_an_unknown_version_is_refused(tmp_path, version) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"version": version, "layers": {}}))
    with pytest.raises(PolicyError, match="version"):
        Policy.load(path)


def test_a_policy_with_keys_it_does_not_know_is_refused(tmp_path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"version": 1, "layers": {}, "layer": {"fc": {}}}))
    with pytest.raises(PolicyError, match="unknown key 'layer'"):
        Policy.load(path)
    path.write_text(json.dumps({"layers": {}, "channel_scores": {"fc": "high"}}))
    with pytest.raises(PolicyError, match="channel_scores"):
        Policy.load(path)
    path.write_text(json.dumps({"layers": {"fc": {"keep_ratio": 0.5}}}))  # version 1 implied
    assert Policy.load(path).layers["fc"].keep_ratio == 0.5


def test_chance_level_is_the_better_of_uniform_and_majority_guessing() -> None:
    from pipeline.core.stats import at_chance, chance_level

    assert chance_level(np.array([0, 1, 2, 3]), 4) == pytest.approx(0.25)
    assert chance_level(np.array([0, 0, 0, 1]), 2) == pytest.approx(0.75)
    # 12% of 360 images is within noise of a tenth; 60% is clearly better than guessing
    assert at_chance(43, 360, 0.1) and not at_chance(216, 360, 0.1)


def _gate_context(digits_splits, model) -> tuple[RunContext, RunRecord]:
    from conftest import TINY_PROFILE

    from pipeline.core.profile import TargetProfile

    inputs, labels = stack(digits_splits.test)
    logits = torch_logits(model, inputs)
    ctx = RunContext(TargetProfile.model_validate(TINY_PROFILE), RunConfig(), Path())
    ctx.splits, ctx.test = digits_splits, run_context.TestSet(inputs, labels, logits)
    record = RunRecord(original=ModelFigures(accuracy=0.0, correct=correct_of(logits, labels)))
    return ctx, record


def _passing_summary() -> dict:
    return {"validation": {"passed": True}, "met_budget": True, "accuracy_drop": 0.0}


def test_an_original_at_chance_is_never_deployable(digits_splits) -> None:
    from conftest import make_tiny_resnet

    # Untrained (seeded): it answers one class for almost every image, 9.5% of them right
    ctx, record = _gate_context(digits_splits, make_tiny_resnet(seed=1))
    gates = _gates(ctx, record, _passing_summary())
    assert not gates["passed"]
    assert any("chance level" in reason for reason in gates["failed"]), gates


def test_a_trained_original_passes_the_chance_gate(digits_splits, trained_tiny_resnet) -> None:
    ctx, record = _gate_context(digits_splits, trained_tiny_resnet)
    assert _gates(ctx, record, _passing_summary())["passed"]
