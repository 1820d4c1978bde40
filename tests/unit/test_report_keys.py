"""report.json's keys are a contract (DESIGN.md section 3): the typed RunRecord must render them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import RunConfig
from pipeline.core.records import Latency, ModelFigures, PrecisionCheck, RunRecord, SearchRecord
from pipeline.run import RunContext
from pipeline.run.report import build_summary, render_markdown, write_report

SIDE_KEYS = {"accuracy", "latency_ms", "params", "macs", "size_bytes"}
LATENCY_KEYS = {"median", "p90", "cv"}
TOP_KEYS = {
    "original",
    "deployed",
    "speedup",
    "accuracy_drop",
    "budget_ms",
    "met_budget",
    "validation",
    "search",
    "baselines",
}
SEARCH_KEYS = {"agent", "episodes", "real_measurements", "cached_measurements", "wall_s"}


def _latency(median: float, rounds: list[float]) -> Latency:
    return Latency(
        median, median * 1.1, median, median * 0.9, 0.02, rounds, 0.01, median / 0.01, False
    )


def _figures(accuracy: float, correct: np.ndarray, median: float) -> ModelFigures:
    return ModelFigures(
        accuracy=accuracy,
        correct=correct,
        params=1000,
        macs=20000,
        size_bytes=4000,
        latency=_latency(median, [median, median * 1.02, median * 0.98]),
    )


def _record(searched: bool) -> RunRecord:
    rng = np.random.default_rng(0)
    original = rng.random(200) < 0.95
    deployed = original.copy()
    deployed[:4] = False
    record = RunRecord(
        original=_figures(float(original.mean()), original, 2.0),
        deployed=_figures(float(deployed.mean()), deployed, 1.0),
        validation={
            "passed": True,
            "top1_agreement": 0.98,
            "max_abs_error": 0.1,
            "nan_or_inf": False,
            "reasons": [],
        },
        precision_check=PrecisionCheck({"median": 1.5}, {"median": 1.0}, 1.5, True, "policy"),
    )
    if searched:
        summary = {k: 1 for k in SEARCH_KEYS} | {"agent": "ppo", "wall_s": 3.0}
        record.search = SearchRecord(summary, budget_ms=1.2, original_ms=2.0)
        record.baselines = {
            "uniform": {
                "accuracy": 0.9,
                "latency_ms": {"median": 1.0, "p90": 1.1, "cv": 0.01},
                "params": 900,
                "macs": 18000,
                "size_bytes": 3900,
            }
        }
        record.baseline_correct = {"uniform": rng.random(200) < 0.9}
    return record


@pytest.mark.parametrize("searched", [False, True])
def test_report_json_keeps_the_design_contract(tiny_profile, tmp_path: Path, searched) -> None:
    ctx = RunContext(tiny_profile, RunConfig(policy=None if searched else "uniform:0.5"), tmp_path)
    summary = write_report(ctx, _record(searched))
    written = json.loads((tmp_path / "report.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert set(written) >= TOP_KEYS
    sides = {"original": written["original"], "deployed": written["deployed"]}
    for name, side in {**sides, **written["baselines"]}.items():
        assert set(side) >= SIDE_KEYS, name
        assert set(side["latency_ms"]) >= LATENCY_KEYS, name
    assert set(written["search"]) >= SEARCH_KEYS
    assert {"passed", "top1_agreement"} <= set(written["validation"])
    assert written["speedup"] == pytest.approx(2.0)  # original over deployed median
    assert 0 <= written["accuracy_drop"] <= 1 and written["accuracy_drop"] == pytest.approx(
        0.02, abs=0.006
    )
    assert written["budget_ms"] == (1.2 if searched else None)
    assert written["met_budget"] is (True if searched else None)
    for path in ("report.md", "pareto.png"):
        assert (tmp_path / path).stat().st_size > 0


def test_the_paired_intervals_come_from_the_records_per_image_results(tiny_profile) -> None:
    ctx = RunContext(tiny_profile, RunConfig(), Path())
    summary = build_summary(ctx, _record(searched=True))
    low, high = summary["accuracy_drop_ci95"]
    assert low - 1e-9 <= summary["accuracy_drop"] <= high + 1e-9 and summary["test_images"] == 200
    assert summary["baselines"]["uniform"]["vs_deployed"]["n"] == 200
    assert summary["gates"]["passed"], summary["gates"]


@pytest.mark.parametrize("relative", [True, False])
def test_a_derived_budget_is_judged_against_the_original_measured_beside_the_deployed_model(
    tiny_profile, tmp_path: Path, relative: bool
) -> None:
    # The original read 1.6 ms when the search began and 2.0 ms beside the deployed model
    # (1.0 ms) at the end: the target ran 1.25x slower. A 0.9 ms budget derived from the
    # original is 1.125 ms at the gate, which the deployed model meets; 0.9 ms given is missed.
    ctx = RunContext(tiny_profile, RunConfig(), tmp_path)
    record = _record(searched=True)
    assert record.search is not None
    record.search.budget_ms, record.search.original_ms = 0.9, 1.6
    record.search.budget_relative = relative
    summary = build_summary(ctx, record)
    assert summary["budget_ms"] == 0.9
    assert summary["budget_ms_at_gate"] == pytest.approx(1.125 if relative else 0.9)
    assert summary["met_budget"] is relative
    failed = summary["gates"]["failed"]
    if relative:
        assert summary["gates"]["passed"], failed
        assert "(1.125 ms at the gate): met" in render_markdown(summary)
    else:
        (line,) = failed
        assert "misses the 0.9 ms budget" in line and "1.25x slower" in line, line
