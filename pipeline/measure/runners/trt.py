"""Native TensorRT: the runner of profiles with `runtime: tensorrt`.

It runs a `.engine` built by `exporters.tensorrt.build_engine` (refused unless its metadata
matches this GPU and TensorRT version), or an `.onnx` graph, whose engine it builds first and
keeps in `$PIPELINE_CACHE/tensorrt`, keyed by the graph's sha256 and the profile's input shape.

Polygraphy's `TrtRunner` holds the execution context, its CUDA stream and the buffers, and runs
`infer`. `measure` reports device time: each sample is the time between two CUDA events recorded
on that stream around one `execute_async_v3`, with the input already on the GPU. Polygraphy's own
timing (`last_inference_time`) is the host's time of a whole `infer` call, argument checks and
buffer set-up included, which at a fraction of a millisecond per batch would swamp the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.onnx_export import OUTPUT_NAME
from pipeline.core.cuda_device import no_cuda_reason
from pipeline.core.errors import ModelError
from pipeline.measure.runners.base import LatencyStats, Runner
from pipeline.measure.runners.registry import register_runner

if TYPE_CHECKING:
    import tensorrt as trt


@contextmanager
def _polygraphy_errors(what: str) -> Iterator[None]:
    """Polygraphy's failures (it logs TensorRT's errors, then raises) as one-line ModelErrors."""
    from polygraphy.exception import PolygraphyException

    from exporters.tensorrt_meta import squash

    try:
        yield
    except PolygraphyException as exc:
        raise ModelError(f"{what}: {squash(str(exc))}") from None


@register_runner("tensorrt")
class TrtRunner(Runner):
    """A TensorRT engine in Polygraphy's runner, with one execution context and CUDA stream."""

    suffixes = (".engine", ".onnx")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        from exporters.tensorrt import tensorrt_unavailable_reason

        missing = [r for r in (tensorrt_unavailable_reason(), no_cuda_reason()) if r]
        return "; ".join(missing) or None

    def _activate_impl(self) -> None:
        import tensorrt as trt
        import torch
        from polygraphy.backend.trt import TrtRunner as PolygraphyRunner

        from exporters.tensorrt import check_input_shape, engine_for_onnx, load_engine

        path = self.artifact
        if path.suffix == ".onnx":
            path = engine_for_onnx(path, self.profile)
        loaded = load_engine(path)
        check_input_shape(
            loaded.metadata, (self.profile.input.batch, *self.profile.input.shape), path
        )
        self.engine_path = path
        self._input = next(iter(loaded.metadata["inputs"]))
        outputs = list(loaded.metadata["outputs"])
        self._output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]
        engine: trt.ICudaEngine = loaded.engine
        self._input_type = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input)))
        self._trt = PolygraphyRunner(engine)
        with _polygraphy_errors(f"{path}: TensorRT could not create an execution context"):
            self._trt.activate()
        self._stream = torch.cuda.ExternalStream(self._trt.stream.ptr)
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._bound: tuple[np.ndarray, Any] | None = None
        self._device_ms: list[float] = []

    def _infer_impl(self, feed: np.ndarray) -> np.ndarray:
        host = np.ascontiguousarray(feed, dtype=self._input_type)
        with _polygraphy_errors(f"{self.engine_path}: TensorRT failed to run the engine"):
            outputs = self._trt.infer({self._input: host})
        self._bound = None  # the context now reads Polygraphy's copy of this feed
        return np.asarray(outputs[self._output], dtype=np.float32)

    def _bind(self, feed: np.ndarray) -> None:
        """Put `feed` on the GPU and run it once through Polygraphy, which sets the input's shape
        and address and allocates the outputs: the timed runs then only execute."""
        import torch

        device_in = torch.from_numpy(np.ascontiguousarray(feed, dtype=self._input_type)).cuda()
        torch.cuda.synchronize()  # the copy ran on torch's stream, the engine runs on its own
        with _polygraphy_errors(f"{self.engine_path}: TensorRT failed to run the engine"):
            self._trt.infer({self._input: device_in}, copy_outputs_to_host=False)
        self._bound = (feed, device_in)

    def _execute(self) -> None:
        context: trt.IExecutionContext = self._trt.context
        if not context.execute_async_v3(self._trt.stream.ptr):
            raise ModelError(
                f"{self.engine_path}: TensorRT failed to run the engine (see its errors above)"
            )

    def _timed_run_impl(self, feed: np.ndarray) -> None:
        if self._bound is None or self._bound[0] is not feed:
            self._bind(feed)
        start, end = self._events
        start.record(self._stream)
        self._execute()
        end.record(self._stream)
        end.synchronize()
        self._device_ms.append(start.elapsed_time(end))

    def measure(self, warmup: int | None = None, repeats: int | None = None) -> LatencyStats:
        """Like `Runner.measure`, but each sample is the GPU time of one execution between CUDA
        events, not the host's wall time (which the runs also take, and which is dropped)."""
        self._device_ms = []
        wall = super().measure(warmup, repeats)
        device_s = [ms * 1e-3 for ms in self._device_ms[-wall.repeats :]]
        return LatencyStats.from_samples(device_s, warmup=wall.warmup, batch=wall.batch)

    def _deactivate_impl(self) -> None:
        self._stream.synchronize()
        self._bound = None
        self._trt.deactivate()
