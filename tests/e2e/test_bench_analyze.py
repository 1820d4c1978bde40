"""`pipeline bench --batch` and `pipeline analyze` through the CLI, at a tiny size. Timings are
real but never judged: only the tables' rows, the JSON keys and the files are."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from cli_main import main_in_process
from conftest import TEST_INPUT, make_fragile_net, run_cli

from exporters import export_onnx
from pipeline.run.analysis import group_columns, layer_columns
from pipeline.search.space import coupling_groups

pytestmark = pytest.mark.e2e

PROFILE = """
name: tiny
runtime: onnxruntime-cpu
precisions: [int8, fp32]
input: {shape: [3, 32, 32], batch: 1}
threads: 1
channel_multiple: 8
min_keep_ratio: 0.25
measure: {warmup: 2, repeats: 30, rounds: 2}
"""
SIDE_KEYS = {"latency_ms", "throughput_ips", "rounds_ms", "noisy", "repeats", "warmup"}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "tiny.yaml").write_text(PROFILE)
    return tmp_path


def _batch_rows(table: str) -> list[str]:
    """The first cell of each table row that holds a batch size."""
    cells = [line.split("│")[1].strip() for line in table.splitlines() if line.count("│") > 2]
    return [c for c in cells if c.isdigit()]


def test_bench_per_batch_of_one_graph_and_of_a_run_directory(workdir: Path) -> None:
    run_dir = workdir / "run"
    run_dir.mkdir()
    for name in ("original.onnx", "model.onnx"):
        export_onnx(make_fragile_net(), TEST_INPUT, run_dir / name)
    graph = run_dir / "model.onnx"

    one = main_in_process(
        "bench", "--target", str(workdir / "tiny.yaml"), str(graph), "--batch", "1,4", "--json"
    )
    assert one.code == 0, one.err
    result = json.loads(one.out)
    assert {"artifact", "runtime", "threads", "rounds", "models", "batches"} <= set(result)
    assert result["models"] == ["model"] and [e["batch"] for e in result["batches"]] == [1, 4]
    for entry in result["batches"]:
        assert set(entry["model"]) >= SIDE_KEYS and len(entry["model"]["rounds_ms"]) == 2
        assert {"median", "p90", "cv"} <= set(entry["model"]["latency_ms"])

    both = main_in_process(
        "bench", "--target", str(workdir / "tiny.yaml"), str(run_dir), "--batch", "1,4"
    )
    assert both.code == 0, both.err
    assert _batch_rows(both.out) == ["1", "4"]
    assert "original" in both.out and "deployed" in both.out and "speedup" in both.out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter
def test_bench_refuses_a_static_batch_in_one_line(workdir: Path) -> None:
    path = workdir / "static.onnx"
    with torch.no_grad():
        torch.onnx.export(
            make_fragile_net(), (torch.zeros(1, *TEST_INPUT),), str(path), dynamo=False
        )
    result = main_in_process(
        "bench", "--target", str(workdir / "tiny.yaml"), str(path), "--batch", "1,8"
    )
    assert result.code == 2 and result.one_line_error, result.err
    assert "static batch of 1" in result.err


def test_analyze_writes_a_row_per_group_and_a_chart(workdir: Path) -> None:
    # FragileNet hard-codes conv2's channel count: its pruned candidate fails, and stays a row
    args = ["--model", "conftest:make_fragile_net", "--random-init", "--no-progress"]
    args += ["--keep-ratios", "0.5", "--candidate-steps", "2", "--out", "analysis"]
    result = run_cli("analyze", "--target", "tiny.yaml", *args, cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = workdir / "analysis"
    with (out / "analysis_groups.csv").open() as f:
        reader = csv.DictReader(f)
        groups = list(reader)
    assert reader.fieldnames == group_columns((0.5,))
    model = make_fragile_net()
    assert {g["group"] for g in groups} == set(coupling_groups(model, TEST_INPUT).values())
    assert len(groups) == len({g["group"] for g in groups})
    failed = {g["group"]: g["keep0.5_error"] for g in groups}
    assert failed["conv2"] and not failed["conv1"], failed
    with (out / "analysis_layers.csv").open() as f:
        reader = csv.DictReader(f)
        layers = list(reader)
    assert reader.fieldnames == layer_columns()
    assert [x["layer"] for x in layers] == ["conv1", "conv2", "fc"]
    assert all(x["int8_accuracy"] for x in layers)  # INT8 alone never breaks the model
    png = (out / "analysis.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(out / "analysis.png").ndim == 3
    document = json.loads((out / "analysis.json").read_text())
    assert [list(g) for g in document["groups"]] == [group_columns((0.5,))] * len(groups)
    assert {"original", "val_images", "keep_ratios", "layers"} <= set(document)
    assert "prunable groups" in result.stdout and "conv2" in result.stdout


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--keep-ratios", "0.5,1.5", "--keep-ratios"), ("--out", "a-file", "is a file")],
)
def test_analyze_refuses_bad_input_before_any_work(
    workdir: Path, option: str, value: str, named: str
) -> None:
    (workdir / "a-file").write_text("")
    args = ["analyze", "--target", str(workdir / "tiny.yaml"), "--out", str(workdir / "a")]
    # no --model: the demo, which would train first were the input not checked before
    result = main_in_process(*args, option, str(workdir / value) if option == "--out" else value)
    assert result.code == 2 and result.one_line_error, result.err
    assert named in result.err and not (workdir / "a").exists()
