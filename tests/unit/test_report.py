"""The report: why a budget was missed, and what the search section says."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import RunConfig
from pipeline.core.records import Latency, RunRecord, SearchRecord
from pipeline.run import RunContext, report


def _latency(median: float) -> Latency:
    return Latency(median, median, median, median, 0.01, [median], None, None, False)


def _drift(tiny_profile, search_ms: float | None, final_ms: float) -> str:
    ctx = RunContext(tiny_profile, RunConfig(), Path())
    record = RunRecord()
    record.original.latency = _latency(final_ms)
    if search_ms is not None:
        record.search = SearchRecord({}, budget_ms=0.5, original_ms=search_ms)
    return report._drift(ctx, record)


def test_a_missed_budget_says_when_the_target_got_slower(tiny_profile) -> None:
    slower = _drift(tiny_profile, 1.0, 1.10)
    assert "1.10x slower" in slower and "pipeline bench" in slower
    assert _drift(tiny_profile, 1.0, 1.02) == ""  # within noise: no excuse
    assert _drift(tiny_profile, None, 1.5) == ""  # no search: no reference


def test_the_search_section_names_the_precisions_and_the_pick_measured_again() -> None:
    from pipeline.run.report_render import _search_markdown

    search = {
        "agent": "ppo",
        "episodes": 4,
        "real_measurements": 3,
        "cached_measurements": 1,
        "wall_s": 12.0,
        "precision_latency_ms": {"fp32": 1.2, "int8": 0.6},
        "search_precision": "int8",
        "confirmation": [
            {"episode": 3, "search_ms": 0.5, "confirmed_ms": 0.81, "meets_budget": False},
            {"episode": 1, "search_ms": 0.55, "confirmed_ms": 0.56, "meets_budget": True},
        ],
    }
    text = "\n".join(_search_markdown({"search": search}))
    assert "fp32 1.200 ms, int8 0.600 ms; channel searches ran in int8" in text
    assert "Episode 3 measured again: 0.810 ms (search 0.500 ms), MISSES the budget" in text
    assert "Episode 1 measured again: 0.560 ms (search 0.550 ms), meets the budget" in text


def _summary(drop_ci: list[float], within: bool) -> dict:
    side = {
        "accuracy": 0.93,
        "accuracy_ci95": [0.925, 0.935],
        "latency_ms": {"median": 1.0, "p90": 1.1, "cv": 0.01},
        "params": 10,
        "macs": 10,
        "size_bytes": 10,
    }
    return {
        "profile": "cpu",
        "runtime": "onnxruntime-cpu",
        "original": side,
        "deployed": {**side, "accuracy": 0.925},
        "speedup": 2.0,
        "speedup_ci95": [1.9, 2.1],
        "accuracy_drop": 0.005,
        "accuracy_drop_ci95": drop_ci,
        "accuracy_drop_within_noise": within,
        "test_images": 10000,
        "budget_ms": None,
        "baselines": {},
        "search": {"agent": "fixed", "policy": "uniform:0.5"},
        "validation": {
            "passed": True,
            "top1_agreement": 0.99,
            "max_abs_error": 0.1,
            "nan_or_inf": False,
        },
        "gates": {"passed": True, "failed": []},
    }


def test_the_report_gives_intervals_and_says_within_noise_when_one_covers_zero() -> None:
    tie = report.render_markdown(_summary([-0.001, 0.011], True))
    assert "accuracy drop 0.50 points [-0.10, 1.10], within noise on 10,000 test images" in tie
    assert "Speedup 2.00x [1.90, 2.10]" in tie
    assert "| test accuracy | 93.00% [92.50, 93.50] | 92.50% [92.50, 93.50] |" in tie
    real = report.render_markdown(_summary([0.002, 0.008], False))
    assert "accuracy drop 0.50 points [0.20, 0.80] on 10,000" in real
    assert "within noise" not in real


def test_markdown_of_a_deployed_model_that_outputs_nan():
    """The comparator gives no error figures when the outputs hold NaN; the report still renders
    and says so."""
    summary = _summary([0.002, 0.008], False)
    summary["validation"] = {
        "passed": False,
        "top1_agreement": 0.0,
        "max_abs_error": None,
        "nan_or_inf": True,
    }
    text = report.render_markdown(summary)
    assert "Validation: FAILED" in text and "max abs logit error n/a, NaN/inf: yes" in text
