"""The report's explanation of a missed budget."""

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
