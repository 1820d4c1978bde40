"""The run's stages one by one on a tiny real model: what each writes into the run directory
and the RunRecord, and how `execute` walks them (manifest after each, a failure recorded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.config import RunConfig
from pipeline.core.policy import Precision, uniform_policy
from pipeline.core.records import RunRecord, SearchRecord
from pipeline.run import plan, stages
from pipeline.run.baselines import BASELINES, run_baselines
from pipeline.run.context import RunContext
from pipeline.run.export_stage import export_deployed

CONFIG = {"finetune": {"steps": 5, "qat": "never"}, "show_progress": False}


def _profile(tiny_profile):
    return tiny_profile.model_copy(
        update={"measure": tiny_profile.measure.model_copy(update={"rounds": 2, "repeats": 30})}
    )


@pytest.fixture(scope="module")
def ran(tmp_path_factory, _trained_tiny_resnet_state, digits_splits):
    """A context and record after every stage of a fixed-policy run but the report."""
    from conftest import TINY_PROFILE, make_tiny_resnet

    from pipeline.core.profile import TargetProfile

    tmp_path = tmp_path_factory.mktemp("stages")
    original = make_tiny_resnet()
    original.load_state_dict(_trained_tiny_resnet_state)
    ctx = RunContext(
        _profile(TargetProfile.model_validate(TINY_PROFILE)), RunConfig(**CONFIG), tmp_path
    )
    ctx.splits, ctx.original = digits_splits, original.eval()
    ctx.model_info = {"arch": "tiny"}
    ctx.policy = uniform_policy(original, 0.5, Precision.INT8)
    record = RunRecord()
    try:
        stages.baseline(ctx, record)
        assert record.original.accuracy is not None and record.original.latency is None
        assert record.original.correct.shape == (len(ctx.test.labels),)
        stages.compress(ctx, record)
        assert record.channels and (tmp_path / "weights.safetensors").is_file()
        export_deployed(ctx, record)
        assert record.precision["mismatched_layers"] == []
        assert record.precision_check is not None  # INT8 is checked against FP32
        stages.measure(ctx, record)
        stages.validate(ctx, record)
        yield ctx, record
    finally:
        ctx.close()


def test_each_stage_fills_its_part_of_the_record(ran) -> None:
    ctx, record = ran
    o, d = record.original, record.deployed
    assert o.latency.median > 0 and d.latency.median > 0
    assert len(o.latency.rounds_ms) == len(d.latency.rounds_ms) == 2
    assert d.params < o.params and d.macs < o.macs  # half the channels are gone
    assert d.accuracy == pytest.approx(float(d.correct.mean()))
    assert record.validation["samples"] == len(ctx.test.labels)
    assert record.precision_check.shipped == "policy"  # a given policy ships as given
    for name in ("original.onnx", "model.onnx", "validation.json"):
        assert (ctx.run_dir / name).stat().st_size > 0


def test_baselines_are_built_measured_and_scored_on_the_same_images(ran) -> None:
    ctx, record = ran
    ctx.config = RunConfig(**CONFIG, search={"matched_accuracy_steps": 0})
    record.search = SearchRecord({"search_precision": "int8"}, budget_ms=1.0, original_ms=1.0)
    run_baselines(ctx, record)
    assert set(record.baselines) == {"int8", "uniform", "uniform_int8"}
    for name, side in record.baselines.items():
        assert (ctx.run_dir / BASELINES / f"{name}.onnx").is_file(), name
        assert 0 < side["keep_ratio"] <= 1 and side["latency_ms"]["median"] > 0
        assert side["deployed_speedup"] > 0 and len(side["deployed_speedup_ci95"]) == 2
        correct = record.baseline_correct[name]
        assert side["accuracy"] == pytest.approx(float(correct.mean()))
    assert record.baselines["int8"]["keep_ratio"] == 1.0
    # a matched-latency baseline says whether it landed within 5% of the deployed latency
    for name in ("uniform", "uniform_int8"):
        side = record.baselines[name]
        assert side["latency_matched"] == (abs(side["deployed_speedup"] - 1) <= 0.05)
    assert "latency_matched" not in record.baselines["int8"]


@pytest.mark.parametrize(
    ("precisions", "expected"),
    [("search", ["uniform_int8_at_floor"]), ("all", ["uniform_at_floor", "uniform_int8_at_floor"])],
)
def test_under_the_floor_objective_the_accuracy_baselines_hold_the_floor(
    ran, precisions: str, expected: list[str]
) -> None:
    ctx, record = ran
    search = {"matched_accuracy_steps": 1, "matched_accuracy_precisions": precisions}
    ctx.config = RunConfig(**CONFIG, search=search)
    summary = {"search_precision": "int8", "accuracy_floor": 0.5}
    record.search = SearchRecord(summary, budget_ms=None, original_ms=1.0)
    run_baselines(ctx, record)
    floor = record.original.accuracy - ctx.profile.max_accuracy_drop
    at_floor = sorted(name for name in record.baselines if name.endswith("_at_floor"))
    assert at_floor == expected  # by default only the search's precision: each step is costly
    for name in expected:
        side = record.baselines[name]
        assert side["target_accuracy"] == pytest.approx(floor)
        assert "latency_matched" not in side
        # judged by the deployed model's rule: validation less the margin, against the
        # search's floor (on validation); every judgement kept, test accuracy beside it
        steps = side["steps"]
        assert steps and all(s["reaches"] == s["holds_floor"] for s in steps)
        for s in steps:
            assert s["holds_floor"] == (s["val_accuracy"] - s["margin"] >= 0.5 - 1e-12)
        # the least keep ratio tried that holds, or the unpruned original when none does
        held = [s["keep_ratio"] for s in steps if s["holds_floor"]]
        assert side["keep_ratio"] == (min(held) if held else 1.0)
        assert side["reached"] is bool(held)
    assert not any(name.endswith("_at_accuracy") for name in record.baselines)


def _args(tmp_path: Path) -> tuple:
    config = RunConfig(
        **CONFIG,
        model="conftest:make_tiny_resnet",
        random_init=True,  # the stages are what is tested, not the model
        policy="uniform:0.5",
        out=tmp_path / "runs",
    )
    return config, tmp_path / "run"


def test_execute_writes_the_stages_done_into_the_manifest(tmp_path, tiny_profile) -> None:
    config, run_dir = _args(tmp_path)
    run_dir.mkdir()
    code = plan.execute(_profile(tiny_profile), config, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and code in (0, 1)
    done = ["baseline", "compress", "export", "measure", "validate", "report"]
    assert manifest["stages_done"] == done  # no search, no engine, no baselines
    assert json.loads((run_dir / "report.json").read_text())["search"]["agent"] == "fixed"


def test_a_stage_added_to_the_list_runs_and_its_failure_is_recorded(
    tmp_path, tiny_profile, monkeypatch
) -> None:
    def broken(ctx, record) -> None:
        raise RuntimeError("stage broke")

    added = plan.Stage("broken", broken)
    stages_list = plan.STAGES
    monkeypatch.setattr(plan, "STAGES", (stages_list[0], added, *stages_list[1:]))
    config, run_dir = _args(tmp_path)
    run_dir.mkdir()
    with pytest.raises(RuntimeError, match="stage broke"):
        plan.execute(_profile(tiny_profile), config, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages_done"] == ["baseline"]
    assert not (run_dir / "report.json").exists()


def test_an_untrained_model_gets_its_batchnorm_statistics_from_the_training_split(
    tmp_path, tiny_profile
) -> None:
    import torch
    from torch import nn

    config, run_dir = _args(tmp_path)
    ctx = RunContext(_profile(tiny_profile), config, run_dir)
    try:
        stages.load_inputs(ctx)
    finally:
        ctx.close()
    norms = [m for m in ctx.original.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not ctx.original.training
    # Untrained statistics are exactly mean 0 / variance 1; estimated ones are not
    for m in norms:
        assert not torch.equal(m.running_var, torch.ones_like(m.running_var)), m
    assert ctx.model_info["batchnorm"].startswith("statistics estimated on the training split")
