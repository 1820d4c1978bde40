"""The calibration samples ONNX Runtime's static quantizer reads, batched as the graph takes them.

Batches are small (the calibrators keep per-batch tensors) and equal in size (the entropy and
percentile collectors stack them); a graph with a fixed batch gets only full batches.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from pipeline.core.errors import DataError

CALIB_BATCH = 8  # at most; small batches keep the calibrator's per-batch tensors small


def calibration_samples(calib_inputs: np.ndarray, limit: int) -> np.ndarray:
    """The first `limit` samples as float32 (N, C, H, W); refused when there are none."""
    samples = np.asarray(calib_inputs, dtype=np.float32)[:limit]
    if samples.ndim != 4 or len(samples) == 0:
        raise DataError(
            f"INT8 calibration needs float32 samples shaped (N, C, H, W) with N >= 1, "
            f"got shape {tuple(samples.shape)}; give the run a calibration split"
        )
    return samples


def calibration_reader(model: onnx.ModelProto, samples: np.ndarray) -> CalibrationDataReader:
    """A reader feeding `samples` to the graph's input in batches it accepts."""
    return _ArrayReader(_graph_input(model).name, samples, _static_batch(model))


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {t.name for t in model.graph.initializer}  # old opsets list them as inputs
    return next(i for i in model.graph.input if i.name not in initializers)


def _static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a graph insists on, or None when the batch axis is dynamic."""
    dim = _graph_input(model).type.tensor_type.shape.dim
    return dim[0].dim_value if dim and dim[0].HasField("dim_value") else None


class _ArrayReader(CalibrationDataReader):
    """Feeds calibration samples to ORT in small batches (or the graph's fixed batch)."""

    def __init__(self, input_name: str, samples: np.ndarray, static_batch: int | None) -> None:
        self._feeds = iter([{input_name: b} for b in _batches(samples, static_batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _batches(samples: np.ndarray, static_batch: int | None) -> list[np.ndarray]:
    """Split (N, C, H, W) samples into contiguous (b, C, H, W) batches the graph accepts."""
    if static_batch is None:
        # Equal batches, all samples used: ORT's entropy / percentile collectors stack each
        # tensor's per-batch outputs into one array and fail on a short last batch.
        step = max(b for b in range(1, CALIB_BATCH + 1) if len(samples) % b == 0)
        count = len(samples)
    else:
        # A fixed-batch graph takes only full batches: drop the short tail rather than pad it
        # with repeats, but repeat a set smaller than one batch (repeats leave min/max as is).
        if len(samples) < static_batch:
            samples = np.resize(samples, (static_batch, *samples.shape[1:]))
        step, count = static_batch, len(samples) // static_batch * static_batch
    return [np.ascontiguousarray(samples[i : i + step]) for i in range(0, count, step)]
