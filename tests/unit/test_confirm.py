"""The search's pick is measured again before it ships; a pick that misses gives way."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import by_size_measure

from pipeline.core.choice import choose_best
from pipeline.core.policy import Precision, uniform_policy
from pipeline.measure.bench import bench_interleaved
from pipeline.search import episode_record
from pipeline.search.confirm import FINALISTS, confirm_pick, finalists, rank_finalists


def _bench(evaluator):
    def bench(artifacts: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
        return bench_interleaved(evaluator.worker.measure, artifacts, rounds=3)

    return bench


def _by_size_bench(evaluator):
    measure = by_size_measure(evaluator)

    def bench(artifacts: Mapping[str, Path], rounds: int = 3) -> dict[str, dict[str, Any]]:
        return bench_interleaved(measure, artifacts, rounds=rounds)

    return bench


@pytest.fixture
def by_size(tiny_evaluator, monkeypatch):
    """The evaluator's side-by-side sessions read latency in proportion to the graph's size."""
    monkeypatch.setattr(tiny_evaluator.worker, "measure", by_size_measure(tiny_evaluator))
    return tiny_evaluator


def _records(evaluator, search_ms: float) -> list[dict[str, Any]]:
    """The unpruned model (the more accurate) and a quarter of its channels, both as if the
    search had measured them at `search_ms`, under the budget."""
    records = []
    for index, keep in enumerate((1.0, 0.25)):
        result = evaluator.evaluate(uniform_policy(evaluator.model, keep, Precision.FP32))
        assert result.ok, result.error
        record = episode_record(index, result, 0.0, evaluator.space.budget_ms)
        records.append({**record, "latency_ms": search_ms, "meets_budget": True})
    assert records[0]["accuracy"] > records[1]["accuracy"]
    return records


def test_a_pick_that_misses_when_measured_again_gives_way_to_the_next(tiny_evaluator):
    """The unpruned model, measured low once by the search, runs at the original's latency:
    over the 70% budget. A quarter of the channels measures under it and ships."""
    original = tiny_evaluator.space.original_latency_ms
    records = _records(tiny_evaluator, 0.1 * original)
    resolution = 1 / len(tiny_evaluator.val_labels)
    bench = _by_size_bench(tiny_evaluator)
    pick, tries = confirm_pick(tiny_evaluator, records, resolution, bench, "median")
    assert [t["episode"] for t in tries] == [0, 1]
    assert [t["meets_budget"] for t in tries] == [False, True]
    assert tries[0]["confirmed_ms"] > tiny_evaluator.space.budget_ms >= tries[1]["confirmed_ms"]
    assert all(t["search_ms"] == 0.1 * original for t in tries)
    assert pick is records[1]


def test_when_no_pick_confirms_the_search_pick_ships_and_every_try_is_reported(tiny_evaluator):
    """Nothing runs in a microsecond: each distinct policy is tried once, none meets, and the
    search's own pick ships for the final gate to report the miss."""
    budget = 1e-6
    tiny_evaluator.use_space(dataclasses.replace(tiny_evaluator.space, budget_ms=budget))
    records = _records(tiny_evaluator, budget)
    records.append({**records[1], "episode": 2})  # the same policy again: not measured twice
    resolution = 1 / len(tiny_evaluator.val_labels)
    pick, tries = confirm_pick(
        tiny_evaluator, records, resolution, _bench(tiny_evaluator), "median"
    )
    assert pick is records[0]
    assert [t["episode"] for t in tries] == [0, 1]
    assert all(not t["meets_budget"] and t["confirmed_ms"] > budget for t in tries)


def test_nothing_under_the_budget_means_nothing_to_confirm(tiny_evaluator):
    records = _records(tiny_evaluator, 1.0)
    records = [{**r, "meets_budget": False} for r in records]
    pick, tries = confirm_pick(tiny_evaluator, records, 0.01, _bench(tiny_evaluator), "median")
    assert pick is None and tries == []


def _floor_records(evaluator, keeps: tuple[float, ...]) -> list[dict[str, Any]]:
    """Candidates at `keeps` (FP32), as if each had held the floor and the search had read the
    larger ones as the faster: the reverse of their size."""
    records = []
    for index, keep in enumerate(keeps):
        result = evaluator.evaluate(uniform_policy(evaluator.model, keep, Precision.FP32))
        assert result.ok, result.error
        record = episode_record(index, result, 0.0, None)
        records.append({**record, "latency_ms": 1.0 - keep / 10, "accuracy": 0.5})
    return records


def test_finalists_are_the_fastest_within_the_floor_one_per_policy(tiny_evaluator):
    records = _floor_records(tiny_evaluator, (1.0, 0.5))
    below = {**records[0], "episode": 7, "latency_ms": 0.01, "accuracy": 0.2}  # under the floor
    again = {**records[1], "episode": 8, "latency_ms": 2.0}  # a policy seen, read slower
    many = [{**records[1], "episode": 10 + i, "policy": {"i": i}} for i in range(FINALISTS)]
    chosen = finalists([*records, below, again, *many], floor=0.4)
    assert [r["episode"] for r in chosen[:2]] == [0, 1]
    assert len(chosen) == FINALISTS and below not in chosen and again not in chosen


@pytest.mark.usefixtures("by_size")
def test_finalists_measured_side_by_side_decide_the_pick(tiny_evaluator):
    """The search read the unpruned model as the fastest; measured again beside the reference
    (latency in proportion to size here), the smallest is, and the pick follows."""
    space = dataclasses.replace(
        tiny_evaluator.space, max_accuracy_drop=1.0, precision_latency_ms={"fp32": 2.0}
    )
    tiny_evaluator.use_space(space)
    records = _floor_records(tiny_evaluator, (1.0, 0.5, 0.25))
    assert choose_best(records, 0.0, space.accuracy_floor) is records[0]
    ranked = rank_finalists(tiny_evaluator, records)
    assert [r["episode"] for r in ranked] == [0, 1, 2]
    assert ranked[0]["ratio"] == pytest.approx(1.0)  # the unpruned model is the reference
    for entry, record in zip(ranked, records, strict=True):
        assert record["source"] == "finalists" and record["search_ms"] == entry["search_ms"]
        assert record["latency_ms"] == pytest.approx(entry["ratio"] * 2.0)
    assert records[2]["latency_ms"] < records[1]["latency_ms"] < records[0]["latency_ms"]
    assert choose_best(records, 0.0, space.accuracy_floor) is records[2]


@pytest.mark.usefixtures("by_size")
def test_without_a_floor_or_with_one_finalist_nothing_is_measured(tiny_evaluator):
    records = _floor_records(tiny_evaluator, (1.0, 0.5))
    assert rank_finalists(tiny_evaluator, records) == []
    space = dataclasses.replace(tiny_evaluator.space, max_accuracy_drop=1.0)
    tiny_evaluator.use_space(space)
    assert rank_finalists(tiny_evaluator, records[:1]) == []
    assert all("search_ms" not in r and r["source"] != "finalists" for r in records)
