"""The measuring process: results match, a timeout kills and restarts it, errors are reported."""

from __future__ import annotations

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
    worker = MeasureWorker(tiny_profile, timeout_s=0.05)
    try:
        with pytest.raises(MeasurementError, match="timed out"):
            worker.measure(onnx_file)  # the child cannot even import onnxruntime in 50 ms
        assert worker._proc is None
        worker.timeout_s = 120
        assert worker.measure(onnx_file)["latency_ms"]["median"] > 0
    finally:
        worker.close()


def test_a_broken_artifact_is_an_error_not_a_crash(tiny_profile, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with MeasureWorker(tiny_profile, timeout_s=120) as worker:
        with pytest.raises(MeasurementError):
            worker.measure(bad)
        assert worker._proc.is_alive()
