"""The measuring process: results match, a timeout kills and restarts it, errors are reported."""

from __future__ import annotations

import os
import time

import pytest

from exporters import export_onnx
from pipeline.core.errors import MeasurementError
from pipeline.measure.measure_worker import MeasureWorker


@pytest.fixture
def onnx_file(tmp_path, trained_tiny_resnet):
    return export_onnx(trained_tiny_resnet, (3, 32, 32), tmp_path / "m.onnx")


def test_measures_in_a_child_process(tiny_profile, onnx_file):
    with MeasureWorker(tiny_profile, timeout_s=120) as worker:
        first = worker.measure(onnx_file)
        pid = worker._proc.pid
        second = worker.measure(onnx_file)
        assert worker._proc.pid == pid  # one persistent worker
    assert first["latency_ms"]["median"] > 0 and second["repeats"] >= 30


def test_timeout_kills_the_worker_and_the_next_job_runs(tiny_profile, onnx_file):
    # A million timed runs: no machine finishes them in a second
    endless = tiny_profile.model_copy(
        update={"measure": tiny_profile.measure.model_copy(update={"repeats": 1_000_000})}
    )
    worker = MeasureWorker(endless, timeout_s=1.0)
    try:
        with pytest.raises(MeasurementError, match="timed out after 1 s"):
            worker.measure(onnx_file)
        assert worker._proc is None
        worker.profile = tiny_profile
        worker.timeout_s = 120
        assert worker.measure(onnx_file)["latency_ms"]["median"] > 0
    finally:
        worker.close()


def test_the_timeout_counts_the_job_not_the_process_start(
    tiny_profile, onnx_file, tmp_path, monkeypatch
):
    """On a busy machine starting the process (its imports) can take longer than a job is
    allowed: here it takes 4 s, and a 2-second timeout still measures."""
    slow = tmp_path / "slow-start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(4)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")]))
    with MeasureWorker(tiny_profile, timeout_s=2.0) as worker:
        started = time.perf_counter()
        assert worker.measure(onnx_file)["latency_ms"]["median"] > 0
        assert time.perf_counter() - started > 4  # the start was waited for, not timed


def test_a_broken_artifact_is_an_error_not_a_crash(tiny_profile, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with MeasureWorker(tiny_profile, timeout_s=120) as worker:
        with pytest.raises(MeasurementError):
            worker.measure(bad)
        assert worker._proc.is_alive()
