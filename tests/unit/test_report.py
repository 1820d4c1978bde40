"""The report: why a budget was missed, and what the search section says."""

from __future__ import annotations

from pathlib import Path

from pipeline import report
from pipeline.config import RunConfig
from pipeline.run import RunContext


def _ctx(tiny_profile, search_ms: float | None, final_ms: float) -> RunContext:
    ctx = RunContext(tiny_profile, RunConfig(), Path())
    ctx.results = {"original": {"latency_ms": {"median": final_ms}}}
    if search_ms is not None:
        ctx.results["search_original_ms"] = search_ms
    return ctx


def test_a_missed_budget_says_when_the_target_got_slower(tiny_profile) -> None:
    slower = report._drift(_ctx(tiny_profile, 1.0, 1.10))
    assert "1.10x slower" in slower and "pipeline bench" in slower
    assert report._drift(_ctx(tiny_profile, 1.0, 1.02)) == ""  # within noise: no excuse
    assert report._drift(_ctx(tiny_profile, None, 1.5)) == ""  # no search: no reference


def test_the_search_section_names_the_precisions_and_the_pick_measured_again() -> None:
    from pipeline.report import _search_markdown

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
