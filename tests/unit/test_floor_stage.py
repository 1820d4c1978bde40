"""The floor stage's next try after a pick that lost the floor once built in full."""

from __future__ import annotations

import pytest

from pipeline.core.records import RunRecord, SearchRecord
from pipeline.run.floor_stage import _next_pick, closest_try


def _record(candidates: list[tuple[float, float]]) -> RunRecord:
    """Candidates as (latency ms, validation score), episodes in order; shipped floor 0.90,
    candidates judged against 0.88 (a recovery allowance of 2 points)."""
    rows = [
        {
            "episode": i,
            "latency_ms": ms,
            "accuracy": acc,
            "policy": {"i": i},
            "error": None,
            "meets_budget": True,
        }
        for i, (ms, acc) in enumerate(candidates)
    ]
    summary = {"accuracy_floor": 0.90, "score_floor": 0.88}
    return RunRecord(search=SearchRecord(summary, None, 1.0, rows))


def test_a_miss_raises_the_score_the_next_try_needs_by_the_gain_it_showed() -> None:
    record = _record([(0.20, 0.880), (0.21, 0.885), (0.25, 0.890), (0.30, 0.95)])
    # episode 0 scored 0.880 and reached 0.885 in full: a gain of half a point, so the next
    # try needs 0.895 to reach 0.90, which skips episodes 1 and 2
    tried = [{"episode": 0, "val_accuracy": 0.885, "holds_floor": False}]
    assert _next_pick(record, tried)["episode"] == 3


def test_when_no_try_holds_the_one_closest_to_the_floor_ships() -> None:
    # scored less their margins: 0.9037, 0.8982, 0.9022: the first try came closest, though
    # the last one built scored above the second
    tried = [
        {"episode": 25, "val_accuracy": 0.9071, "margin": 0.0034, "holds_floor": False},
        {"episode": 18, "val_accuracy": 0.9016, "margin": 0.0034, "holds_floor": False},
        {"episode": 39, "val_accuracy": 0.9056, "margin": 0.0034, "holds_floor": False},
    ]
    assert closest_try(tried) == 25
    # a wider margin (a noisier score) can outweigh a higher accuracy
    tried[2] |= {"val_accuracy": 0.9080, "margin": 0.0050}
    assert closest_try(tried) == 25


def test_before_any_miss_the_search_floor_applies() -> None:
    record = _record([(0.20, 0.870), (0.21, 0.881), (0.25, 0.95)])
    assert _next_pick(record, [])["episode"] == 1


def test_descent_scales_every_keep_ratio_but_the_heads_down_to_the_least() -> None:
    from pipeline.core.policy import LayerAction, Policy, Precision
    from pipeline.run.descent import scaled

    int8 = Precision.INT8
    pick = Policy(
        {"a": LayerAction(0.8, int8), "b": LayerAction(0.3, int8), "fc": LayerAction(1.0, int8)},
        removed=("layer3.1",),
    )
    out = scaled(pick, 0.5, head="fc", min_keep=0.25)
    assert out.keep_ratios() == {"a": 0.4, "b": 0.25, "fc": 1.0}
    assert out.removed == ("layer3.1",) and out.precisions() == pick.precisions()

    # weighted: each layer by the scale to its power; a layer without a weight stays
    only = scaled(pick, 0.5, head="fc", min_keep=0.25, weights={"a": 1.0})
    assert only.keep_ratios() == {"a": 0.4, "b": 0.3, "fc": 1.0}
    half = scaled(pick, 0.25, head="fc", min_keep=0.25, weights={"a": 0.5, "b": 0.0, "fc": 1.0})
    assert half.keep_ratios() == {"a": 0.4, "b": 0.3, "fc": 1.0}


def test_the_descent_weighs_each_run_by_its_measured_saving_over_the_largest() -> None:
    from pipeline.run.descent import _weights

    direction = [
        {"layers": ["a", "b"], "saving": 0.10},
        {"layers": ["c"], "saving": 0.025},
        {"layers": ["d"], "saving": -0.01},  # slower in the session: noise, left as it is
    ]
    assert _weights(direction) == {"a": 1.0, "b": 1.0, "c": 0.25, "d": 0.0}
    assert [d["weight"] for d in direction] == [1.0, 0.25, 0.0]
    # nothing saved, or no runs: one factor for every layer
    assert _weights([{"layers": ["a"], "saving": -0.02}]) is None
    assert _weights([]) is None


def test_the_group_pass_cuts_live_layers_into_runs_of_about_equal_latency() -> None:
    from pipeline.core.policy import LayerAction, Policy, Precision
    from pipeline.run.descent import layer_groups

    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "fc"]
    pick = Policy({n: LayerAction(0.5, Precision.INT8) for n in names}, removed=("layer1.0",))
    shares = {"conv1": 0.4, "layer1.0.conv1": 0.3, "layer2.0.conv1": 0.1, "layer2.0.conv2": 0.3}
    # the removed block's layers and the head are left out; conv1 alone carries half the time
    assert layer_groups(pick, shares, head="fc", count=2) == [
        ["conv1"],
        ["layer2.0.conv1", "layer2.0.conv2"],
    ]
    assert layer_groups(pick, shares, head="fc", count=4) == [
        ["conv1"],
        ["layer2.0.conv1"],
        ["layer2.0.conv2"],
    ]
    # no share known: equal numbers of layers
    assert layer_groups(pick, {}, head="fc", count=3) == [
        ["conv1"],
        ["layer2.0.conv1"],
        ["layer2.0.conv2"],
    ]


def test_a_model_holds_the_floor_by_a_margin_for_the_test_set() -> None:
    import numpy as np
    from scipy.stats import norm

    from pipeline.run.floor_rule import judge

    original = np.ones(1000, bool)
    step = np.ones(1000, bool)
    step[:10] = False  # 99.0%: ten images lost, none gained
    judged = judge(original, step, floor=0.98, n_test=1000, confidence=0.9)
    se = judged["standard_error"]
    assert judged["val_accuracy"] == 0.99 and 0.001 < se < 0.006
    # validation's and an equal test set's standard errors combined, at the one-sided 90% point
    assert judged["margin"] == pytest.approx(norm.ppf(0.9) * se * 2**0.5)
    assert judged["holds_floor"]  # 0.99 less the margin (~0.0028) still reaches 0.98
    assert not judge(original, step, floor=0.989, n_test=1000, confidence=0.9)["holds_floor"]
    # 0.5: the validation estimate alone, no margin
    assert judge(original, step, floor=0.99, n_test=1000, confidence=0.5)["holds_floor"]


def test_only_rungs_faster_than_every_wider_one_are_tried() -> None:
    """A smaller shape can run slower (channel counts round, kernels change with the shape):
    the descent tries only rungs at least 2% faster than the pick and every wider rung kept."""
    from pipeline.run.descent import faster_rungs

    ratios = [0.99, 0.95, 1.10, 0.94, 0.90, 0.91, 0.80]
    assert faster_rungs(ratios) == [False, True, False, False, True, False, True]
    assert faster_rungs([1.02, 1.30]) == [False, False]
    assert faster_rungs([]) == []
