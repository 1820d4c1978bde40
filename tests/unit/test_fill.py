"""Under a budget, the pick scaled along its own shape to the budget's aim
(`pipeline.run.fill`)."""

from __future__ import annotations

import pytest

from pipeline.core.policy import LayerAction, Policy, Precision
from pipeline.run.descent import scaled
from pipeline.run.fill import _ladder
from pipeline.run.fill_text import fill_markdown


def _sides(pick: list[float], **rungs: list[float]) -> dict[str, dict[str, list[float]]]:
    return {"pick": {"rounds_ms": pick}, **{k: {"rounds_ms": v} for k, v in rungs.items()}}


def _chosen(ladder: list[dict]) -> list[str]:
    return [r["name"] for r in ladder if r["chosen"]]


def test_widening_ships_the_widest_rung_within_the_aim_read_per_round_against_the_pick() -> None:
    # the machine slows by half in round 2: per-round ratios, not medians, place each rung
    sides = _sides([0.10, 0.15], x105=[0.105, 0.1575], x110=[0.11, 0.165], x120=[0.13, 0.195])
    ladder = _ladder(sides, ["x105", "x110", "x120"], ("pick", 0.20), 0.225, wider=True)
    assert [round(r["ms"], 3) for r in ladder] == [0.21, 0.22, 0.26]
    assert [r["within"] for r in ladder] == [True, True, False]
    assert _chosen(ladder) == ["x110"]


def test_one_rung_over_the_aim_stops_the_walk_up() -> None:
    # x1.10 reads over, x1.20 under (noise or channel rounding): a wider model is not trusted
    sides = _sides([0.1], x105=[0.105], x110=[0.13], x120=[0.11])
    ladder = _ladder(sides, ["x105", "x110", "x120"], ("pick", 0.2), 0.225, wider=True)
    assert _chosen(ladder) == ["x105"]
    # the first rung already over: the pick ships as found
    over = _ladder(_sides([0.1], x105=[0.2]), ["x105"], ("pick", 0.2), 0.225, wider=True)
    assert _chosen(over) == []


def test_narrowing_ships_the_first_rung_within_the_aim_or_the_pick() -> None:
    sides = _sides([0.1], x095=[0.097], x090=[0.092], x085=[0.088])
    ladder = _ladder(sides, ["x095", "x090", "x085"], ("pick", 0.42), 0.40, wider=False)
    assert [r["within"] for r in ladder] == [False, True, True]
    assert _chosen(ladder) == ["x090"]
    nothing = _ladder(_sides([0.1], x095=[0.099]), ["x095"], ("pick", 0.42), 0.40, wider=False)
    assert _chosen(nothing) == []


def test_under_a_budget_derived_from_the_original_rungs_are_read_against_the_original() -> None:
    # The original read 1.0 ms when the search began and 1.2 ms in this session: the target
    # runs slower now. On the start's scale, the one the gate judges a derived budget on, a rung
    # reading 0.24 ms here is 0.20 ms: within an aim of 0.225 ms, where its own reading is not.
    sides = {
        "original": {"rounds_ms": [1.2, 1.2]},
        **_sides([0.216, 0.216], x110=[0.24, 0.24], x120=[0.276, 0.276]),
    }
    ladder = _ladder(sides, ["x110", "x120"], ("original", 1.0), 0.225, wider=True)
    assert [round(r["ms"], 3) for r in ladder] == [0.2, 0.23]
    assert _chosen(ladder) == ["x110"]


def test_scaling_caps_keep_ratios_at_one_and_keeps_shape_precisions_and_removals() -> None:
    int8, fp32 = Precision.INT8, Precision.FP32
    pick = Policy(
        {"a": LayerAction(0.8, int8), "b": LayerAction(0.3, fp32), "fc": LayerAction(1.0, int8)},
        removed=("layer3.1",),
    )
    out = scaled(pick, 1.5, head="fc", min_keep=0.1)
    assert out.keep_ratios() == {"a": 1.0, "b": pytest.approx(0.45), "fc": 1.0}
    assert out.removed == ("layer3.1",) and out.precisions() == pick.precisions()


def test_the_report_lists_the_ladder_and_what_shipped() -> None:
    fill = {
        "pick_ms": 0.2,
        "target_ms": 0.225,
        "scale": 1.1,
        "ladder": [
            {"name": "x1.05", "ms": 0.21, "within": True},
            {"name": "x1.10", "ms": 0.22, "within": True},
            {"name": "x1.20", "ms": 0.26, "within": False},
        ],
    }
    (line,) = fill_markdown(fill)
    assert "x1.20 0.260 ms (over)" in line and line.endswith("Shipped: the pick scaled x1.10")
    assert fill_markdown({"pick_ms": 0.3, "target_ms": 0.2, "ladder": [], "scale": None}) == []
