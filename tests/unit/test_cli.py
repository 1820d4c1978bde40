"""The CLI's argument handling, in process: bad input is one line and exit 2, before any work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.core.config import RunConfig, SearchConfig

TINY_MODEL = ("--model", "conftest:make_tiny_resnet", "--random-init", "--no-progress")


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def test_every_run_option_names_a_config_field() -> None:
    # The CLI copies options into the run config by name: a renamed field must fail here
    assert set(cli.RUN_OPTIONS) <= set(RunConfig.model_fields)
    assert set(cli.SEARCH_OPTIONS) <= set(SearchConfig.model_fields)


def test_an_unknown_target_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = _main(monkeypatch, capsys, "run", "--target", "nowhere.yaml", *TINY_MODEL)
    assert code == 2
    assert "nowhere.yaml" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--policy", "uniform:7", "uniform:7"), ("--agent", "nosuchagent", "nosuchagent")],
)
def test_bad_run_input_fails_before_a_run_directory_exists(
    monkeypatch, capsys, tmp_path: Path, option: str, value: str, named: str
) -> None:
    (tmp_path / "tiny.yaml").write_text(
        "name: tiny\nruntime: onnxruntime-cpu\nprecisions: [int8, fp32]\n"
        "input: {shape: [3, 32, 32], batch: 1}\nthreads: 1\n"
    )
    monkeypatch.chdir(tmp_path)
    args = ("run", "--target", "tiny.yaml", *TINY_MODEL, "--out", "runs", option, value)
    code, err = _main(monkeypatch, capsys, *args)
    assert code == 2, err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing that looks like a run was started


def test_a_resume_of_a_folder_that_is_no_run_is_exit_2(monkeypatch, capsys, tmp_path) -> None:
    code, err = _main(monkeypatch, capsys, "run", "--target", "cpu", "--resume", str(tmp_path))
    assert code == 2 and str(tmp_path.name) in err, err


def test_bench_reads_the_input_shape_from_a_static_graph(monkeypatch, capsys, tmp_path) -> None:
    import json

    from conftest import make_tiny_resnet

    from exporters import export_onnx

    path = export_onnx(make_tiny_resnet(), (3, 20, 24), tmp_path / "model.onnx")
    args = ("bench", "--target", "cpu", str(path), "--json")
    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    with pytest.raises(SystemExit) as exit_info:  # typer exits 0 at the end of a command
        cli.main()
    assert exit_info.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert result["latency_ms"]["median"] > 0  # the profile's 48x48 would not even run
    code, err = _main(
        monkeypatch, capsys, "bench", "--target", "cpu", str(path), "--input-shape", "3x48x48"
    )
    assert code == 2 and "Traceback" not in err  # the graph refuses another shape: one line
