"""The latency model: features, fit, when it may stand in for a measurement, and in a search."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.core.policy import Precision, uniform_policy
from pipeline.core.space import LayerInfo, SearchSpace
from pipeline.measure import latency_model as lm
from pipeline.measure.latency_model import LatencyModel, should_measure


def _layer(name: str, params: int, share: float) -> LayerInfo:
    return LayerInfo(name, "conv", 8, 8, 3, 1, params * 10, params, share, True, name)


def _space(budget: float | None = 1.0) -> SearchSpace:
    layers = (_layer("a", 100, 0.5), _layer("b", 300, 0.3))
    return SearchSpace(
        layers=layers,
        precisions=(Precision.INT8, Precision.FP32),
        min_keep=0.1,
        budget_ms=budget,
        original_accuracy=0.9,
        original_latency_ms=2.0,
        original_macs=4000,
        precision_latency_ms={"fp32": 2.0, "int8": 1.0},
    )


def test_features_are_work_and_presence_per_precision_in_shares_of_the_original() -> None:
    model = LatencyModel(_space())
    x = model.features({"a": 50, "b": 300}, {"a": "int8", "b": "fp32"})
    # [1, work int8, work fp32, presence int8, presence fp32, boundaries]: a's 80 output
    # elements (8 channels x 10 positions) cross from INT8 to FP32, of 160 in all
    assert x == pytest.approx([1.0, 0.5 * 0.5, 0.3 * 1.0, 0.5, 0.3, 0.5])
    pruned = model.features({"a": 50, "b": 300}, {"a": "int8", "b": "fp32"}, {"a": 4})
    assert pruned[-1] == pytest.approx(40 / 160)  # a pruned to 4 channels: half the traffic
    same = model.features({"a": 50, "b": 300}, {"a": "int8", "b": "int8"})
    assert same[-1] == 0.0  # one precision throughout: nothing is converted between layers
    removed = model.features({"b": 150}, {"b": "int8"})  # "a" went with its block
    assert removed == pytest.approx([1.0, 0.3 * 0.5, 0.0, 0.3, 0.0, 0.0])


def test_the_prior_knows_the_original_in_each_precision() -> None:
    model = LatencyModel(_space())
    for precision, ms in (("fp32", 2.0), ("int8", 1.0)):
        x = model.features({"a": 100, "b": 300}, {"a": precision, "b": precision})
        # Unfitted coefficients: the remainder (20%) plus each precision's relative speed.
        assert float(np.asarray(x) @ model._prior()) * 2.0 == pytest.approx(0.4 + 1.6 * ms / 2)


def test_the_fit_recovers_a_latency_rule_from_measurements() -> None:
    """Latency = 0.1 ms + 1.5 ms x FP32 work + 0.6 ms x INT8 work + 0.2 ms per INT8 presence
    + 0.8 ms per share of activations converted between precisions."""
    model = LatencyModel(_space())
    rng = np.random.default_rng(0)
    for _ in range(12):
        sizes = {"a": int(rng.integers(10, 101)), "b": int(rng.integers(30, 301))}
        precisions = {n: str(rng.choice(["int8", "fp32"])) for n in sizes}
        x = model.features(sizes, precisions, {"a": int(rng.integers(2, 9))})
        truth = 0.1 + 1.5 * x[2] + 0.6 * x[1] + 0.2 * x[3] + 0.8 * x[5]
        model.observe(x, truth, model.predict(x))
    assert model.ready and model.trusted
    probe = model.features({"a": 70, "b": 90}, {"a": "fp32", "b": "int8"})
    truth = 0.1 + 1.5 * probe[2] + 0.6 * probe[1] + 0.2 * probe[3] + 0.8 * probe[5]
    assert model.predict(probe) == pytest.approx(truth, rel=0.05)
    summary = model.summary()
    assert summary["fitted_on"] == 12 and summary["checked"] == 12 - lm.MIN_FIT
    assert summary["median_abs_error"] < 0.05


def _trusted(space: SearchSpace, error: float) -> LatencyModel:
    model = LatencyModel(space)
    x = model.features({"a": 100, "b": 300}, {"a": "fp32", "b": "fp32"})
    for _ in range(lm.MIN_FIT):
        model.observe(x, 2.0, 2.0 * (1 + error))
    return model


def test_only_candidates_that_cannot_matter_go_unmeasured() -> None:
    model = _trusted(_space(budget=1.0), error=0.02)  # margin 5%
    assert model.trusted and model.margin() == pytest.approx(lm.MIN_MARGIN)
    seen: list[float] = []

    def could_win(ms: float) -> bool:
        seen.append(ms)
        return ms < 0.5

    assert not should_measure(model, 1.2, could_win)  # clearly over: never asked
    assert seen == []
    assert not should_measure(model, 1.02, could_win)  # near the budget, cannot win
    assert seen[-1] == pytest.approx(1.02 * 0.95)  # judged at the favourable end
    assert should_measure(model, 0.5, could_win)  # 0.475 optimistic: could win
    assert should_measure(model, None, could_win)  # no prediction


def test_an_inaccurate_or_budgetless_model_measures_everything() -> None:
    wrong = _trusted(_space(budget=1.0), error=0.3)
    assert wrong.ready and not wrong.trusted
    never = lambda ms: False  # noqa: E731
    assert should_measure(wrong, 5.0, never)
    no_budget = _trusted(_space(budget=None), error=0.0)
    assert no_budget.trusted and should_measure(no_budget, 5.0, never)
    fresh = LatencyModel(_space())
    x = fresh.features({"a": 100}, {"a": "fp32"})
    assert fresh.predict(x) is None and not fresh.trusted


def test_state_round_trips() -> None:
    model = _trusted(_space(), error=0.01)
    copy = LatencyModel(_space())
    copy.restore(model.state())
    x = model.features({"a": 40, "b": 200}, {"a": "int8", "b": "fp32"})
    assert copy.predict(x) == pytest.approx(model.predict(x))
    assert copy.summary() == model.summary()
    # a state saved with another feature layout (an older version's) is not misread as this one
    older = {**model.state(), "xs": [x[:-1] for x in model.state()["xs"]]}
    copy.restore(older)
    assert copy.xs == [] and copy.ys == [] and not copy.ready


@pytest.fixture
def steady_evaluator(tmp_path, trained_tiny_resnet, digits_splits):
    """`tiny_evaluator` measuring over 200 timed runs: one sub-millisecond measurement over 30
    runs on a shared machine can be off by a third, which says nothing about the fit."""
    from conftest import TINY_PROFILE, make_tiny_evaluator

    from pipeline.core.profile import TargetProfile

    data = {**TINY_PROFILE, "measure": {"warmup": 10, "repeats": 200}}
    profile = TargetProfile.model_validate(data)
    evaluator = make_tiny_evaluator(trained_tiny_resnet, digits_splits, profile, tmp_path)
    yield evaluator
    evaluator.close()


def test_the_evaluator_predicts_only_what_cannot_matter_and_counts_it(
    steady_evaluator, monkeypatch
):
    """Real candidates, measured with ONNX Runtime, fit the model; then a candidate clearly
    over the budget is predicted instead of measured, and never enters the cache."""
    ev = steady_evaluator
    model = ev.latency_model
    assert model is not None and len(model.ys) == 2  # the original in FP32 and in INT8
    budget = ev.space.budget_ms
    ev.use_space(dataclasses.replace(ev.space, budget_ms=None))  # nothing can be ruled out
    for keep in (0.25, 0.5, 1.0):
        for precision in (Precision.FP32, Precision.INT8):
            result = ev.evaluate(uniform_policy(ev.model, keep, precision))
            assert result.ok and result.source in ("measured", "cached"), result.error
    # Fitted on real measurements and checked against the later ones. How close it came
    # depends on how busy the machine was: its accuracy is a benchmark's figure, and a broken
    # fit is caught on exact latencies by the tests above.
    assert model.ready and model.summary()["checked"] >= 2
    # Trusted whatever its error, it stands in for a clearly-over candidate.
    monkeypatch.setattr(lm, "MAX_ERROR", 10.0)
    monkeypatch.setattr(lm, "MIN_CHECKED", 0)
    ev.use_space(dataclasses.replace(ev.space, budget_ms=budget / 1000))
    real, cached = ev.real_measurements, ev.cached_measurements
    lines = len(ev.cache.path.read_text().splitlines())
    over = ev.evaluate(uniform_policy(ev.model, 0.9, Precision.FP32))
    assert over.ok and over.source == "predicted" and over.latency_ms > budget / 1000
    assert ev.predicted_measurements == 1
    assert (ev.real_measurements, ev.cached_measurements) == (real, cached)
    assert len(ev.cache.path.read_text().splitlines()) == lines  # never cached


def test_one_in_every_few_predictions_is_audited() -> None:
    model = _trusted(_space(budget=1.0), error=0.02)
    never = lambda ms: False  # noqa: E731
    decisions = [should_measure(model, 5.0, never) for _ in range(2 * lm.AUDIT_EVERY)]
    expected = ([False] * (lm.AUDIT_EVERY - 1) + [True]) * 2
    assert decisions == expected
    copy = LatencyModel(_space())
    copy.restore(model.state())
    assert copy.skipped == model.skipped == 0


def test_a_search_with_the_latency_model_ships_only_measured_candidates(
    tiny_evaluator, tmp_path, monkeypatch
):
    """A random search of real candidates: what the model predicted never becomes the best,
    and every candidate is counted once as measured, cached, predicted or failed."""
    from pipeline.search import run_search

    monkeypatch.setattr(lm, "MAX_ERROR", 10.0)  # trusted as soon as it has been checked
    outcome = run_search(
        tiny_evaluator,
        agent_name="random",
        reward_name="budget",
        episodes=14,
        run_dir=tmp_path,
        show_progress=False,
    )
    counts = outcome.summary()
    total = (
        counts["real_measurements"]
        + counts["cached_measurements"]
        + counts["predicted_measurements"]
        + counts["failed_candidates"]
    )
    assert total == 14
    predicted = [r for r in outcome.records if r["source"] == "predicted"]
    assert predicted and counts["latency_model"]["checked"] >= lm.MIN_CHECKED
    assert outcome.best is not None and outcome.best["source"] != "predicted"
    resolution = 1.0 / len(tiny_evaluator.val_labels)
    for record in predicted:  # could not have been the result, had it been measured
        over = record["latency_ms"] > tiny_evaluator.space.budget_ms
        beaten = record["accuracy"] < outcome.best["accuracy"] - resolution + 1e-9
        slower = record["latency_ms"] >= outcome.best["latency_ms"]
        assert over or beaten or slower
