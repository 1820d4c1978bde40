"""Latency per batch size: parsing, the static-batch check, the interleaving, the report's
table. No timing is asserted: the measurements here are stand-ins or real but unjudged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.core.profile import TargetProfile
from pipeline.measure.batches import (
    bench_batches,
    check_batches,
    parse_batches,
    static_batch,
    with_batch,
)


def test_batches_parse_in_the_order_given_without_repeats() -> None:
    assert parse_batches("1,8,32") == (1, 8, 32)
    assert parse_batches(" 8, 1 ,8") == (8, 1)


@pytest.mark.parametrize("text", ["", "1,x", "0", "-4", "1.5", "5000"])
def test_bad_batches_are_one_line_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--batch") as info:
        parse_batches(text)
    assert "\n" not in str(info.value)


def test_a_batch_whose_input_would_not_fit_is_refused(tiny_profile: TargetProfile) -> None:
    assert with_batch(tiny_profile, 8).input.batch == 8
    data = _data(tiny_profile)
    data["input"]["shape"] = [3, 2048, 2048]
    with pytest.raises(ConfigError, match="over the limit"):
        with_batch(TargetProfile.model_validate(data), 4096)


def _data(profile: TargetProfile) -> dict[str, Any]:
    return profile.model_dump(mode="json")


def test_report_batches_are_checked_with_the_profile(tiny_profile: TargetProfile) -> None:
    data = _data(tiny_profile)
    data["measure"]["report_batches"] = [1, 8]
    assert TargetProfile.model_validate(data).measure.report_batches == [1, 8]
    data["measure"]["report_batches"] = [0]
    with pytest.raises(ValueError):
        TargetProfile.model_validate(data)
    data["measure"]["report_batches"] = [4096]
    data["input"]["shape"] = [3, 1024, 1024]
    with pytest.raises(ValueError, match="report_batches"):
        TargetProfile.model_validate(data)


def _export(tmp_path: Path, dynamic: bool) -> Path:
    from conftest import make_fragile_net

    from exporters import export_onnx

    path = tmp_path / ("dynamic.onnx" if dynamic else "static.onnx")
    if dynamic:
        return export_onnx(make_fragile_net(), (3, 16, 16), path)
    with torch.no_grad():
        torch.onnx.export(make_fragile_net(), (torch.zeros(2, 3, 16, 16),), str(path), dynamo=False)
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter
def test_a_static_batch_is_named_and_refused_for_other_sizes(tmp_path: Path) -> None:
    dynamic, static = _export(tmp_path, True), _export(tmp_path, False)
    assert static_batch(dynamic) is None  # our exports have a dynamic batch axis
    check_batches(dynamic, (1, 8, 32))
    assert static_batch(static) == 2
    check_batches(static, (2,))
    with pytest.raises(ConfigError, match="static batch of 2, so it cannot run batch 1, 8"):
        check_batches(static, (1, 2, 8))


class FakeWorker:
    """A measuring process stand-in that logs the order of its measurements."""

    def __init__(self, batch: int, log: list[tuple[int, str]]) -> None:
        self.batch, self.log = batch, log

    def measure(self, path: Path) -> dict[str, Any]:
        self.log.append((self.batch, path.name))
        ms = float(len(self.log))
        stats = {"median": ms, "p90": ms, "mean": ms, "min": ms, "cv": 0.0}
        return {"latency_ms": stats, "floor_ms": None, "noisy": False, "batch": self.batch}


def test_rounds_go_over_every_batch_and_model_in_turn() -> None:
    log: list[tuple[int, str]] = []
    workers = {b: FakeWorker(b, log) for b in (1, 8)}
    artifacts = {"original": Path("original.onnx"), "deployed": Path("model.onnx")}
    entries = bench_batches(workers, artifacts, rounds=2)  # type: ignore[arg-type]
    one_round = [(1, "original.onnx"), (1, "model.onnx"), (8, "original.onnx"), (8, "model.onnx")]
    assert log == one_round * 2
    assert [e["batch"] for e in entries] == [1, 8]
    for entry in entries:
        assert set(entry) == {"batch", "original", "deployed", "speedup"}
        for side in ("original", "deployed"):
            assert len(entry[side]["rounds_ms"]) == 2
            lat = entry[side]["latency_ms"]["median"]
            assert entry[side]["throughput_ips"] == pytest.approx(entry["batch"] * 1e3 / lat)


def test_the_report_shows_latency_per_batch() -> None:
    from pipeline.run.report import _batch_entry
    from pipeline.run.report_render import _batches_markdown

    log: list[tuple[int, str]] = []
    workers = {b: FakeWorker(b, log) for b in (1, 8)}
    artifacts = {"original": Path("original.onnx"), "deployed": Path("model.onnx")}
    entries = [_batch_entry(e) for e in bench_batches(workers, artifacts, rounds=1)]  # type: ignore[arg-type]
    assert set(entries[0]) == {"batch", "original", "deployed", "speedup"}
    assert set(entries[0]["deployed"]) == {"median", "p90", "cv", "throughput_ips"}
    lines = _batches_markdown({"latency_by_batch": entries})
    rows = [line for line in lines if line.startswith("| 1 ") or line.startswith("| 8 ")]
    assert len(rows) == 2
    assert _batches_markdown({"latency_by_batch": []}) == []
