"""Native TensorRT: the runner of profiles with `runtime: tensorrt`.

It runs a `.engine` built by `exporters.tensorrt.build_engine` (refused unless its metadata
matches this GPU and TensorRT version), or an `.onnx` graph, whose engine it builds first and
keeps in `$PIPELINE_CACHE/tensorrt`, keyed by the graph's sha256 and the profile's input shape.

Buffers live in GPU memory allocated by torch, and the engine runs on its own CUDA stream with
`execute_async_v3`. `measure` reports device time: each sample is the time between two CUDA
events recorded on that stream around one execution, with the input already on the GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporters.onnx_export import OUTPUT_NAME
from pipeline.core.cuda_device import no_cuda_reason
from pipeline.core.errors import ModelError
from pipeline.measure.runners.base import LatencyStats, Runner
from pipeline.measure.runners.registry import register_runner


def _torch_dtype(np_type: Any) -> Any:
    import torch

    return torch.from_numpy(np.empty(0, dtype=np_type)).dtype


@register_runner("tensorrt")
class TrtRunner(Runner):
    """A TensorRT engine and one execution context on a dedicated CUDA stream."""

    suffixes = (".engine", ".onnx")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        from exporters.tensorrt import tensorrt_unavailable_reason

        return no_cuda_reason() or tensorrt_unavailable_reason()

    def _activate_impl(self) -> None:
        import torch

        from exporters.tensorrt import check_input_shape, engine_for_onnx, load_engine

        path = self.artifact
        if path.suffix == ".onnx":
            path = engine_for_onnx(path, self.profile)
        loaded = load_engine(path)
        check_input_shape(
            loaded.metadata, (self.profile.input.batch, *self.profile.input.shape), path
        )
        self._loaded = loaded
        self._input, self._outputs, self._dtypes = self._io_tensors(loaded.engine)
        self._context = loaded.engine.create_execution_context()
        if self._context is None:
            raise ModelError(
                f"{path}: TensorRT could not create an execution context ({self._why()})"
            )
        self.engine_path = path
        self._stream = torch.cuda.Stream()
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._bound: tuple[np.ndarray, Any, dict[str, Any]] | None = None
        self._device_ms: list[float] = []

    def _io_tensors(self, engine: Any) -> tuple[str, list[str], dict[str, Any]]:
        """The input's name, the outputs' names, and the torch dtype of each."""
        from exporters.tensorrt import import_tensorrt

        trt = import_tensorrt()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        outputs.sort(key=lambda n: n != OUTPUT_NAME)  # the logits first, whatever TRT's order
        if len(inputs) != 1 or not outputs:
            raise ModelError(
                f"{self.artifact}: expected one image input and an output, the engine has inputs "
                f"{inputs} and outputs {outputs}"
            )
        dtypes = {n: _torch_dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        return inputs[0], outputs, dtypes

    def _why(self) -> str:
        return self._loaded.log.last_error()

    def _bind(self, feed: np.ndarray) -> None:
        """Copy `feed` to the GPU, size the outputs for its shape, give TensorRT the addresses."""
        import torch

        with torch.cuda.stream(self._stream):
            device_in = torch.from_numpy(np.ascontiguousarray(feed)).to(
                device="cuda", dtype=self._dtypes[self._input]
            )
            if not self._context.set_input_shape(self._input, tuple(device_in.shape)):
                raise ModelError(
                    f"{self.engine_path}: TensorRT refused input shape {tuple(feed.shape)} "
                    f"({self._why()})"
                )
            outs = {
                name: torch.empty(
                    tuple(self._context.get_tensor_shape(name)),
                    dtype=self._dtypes[name],
                    device="cuda",
                )
                for name in self._outputs
            }
        self._context.set_tensor_address(self._input, device_in.data_ptr())
        for name, tensor in outs.items():
            self._context.set_tensor_address(name, tensor.data_ptr())
        self._stream.synchronize()  # the input is on the GPU before anything is timed
        self._bound = (feed, device_in, outs)

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise ModelError(
                f"{self.engine_path}: TensorRT failed to run the engine ({self._why()})"
            )

    def _infer_impl(self, feed: np.ndarray) -> np.ndarray:
        import torch

        self._bind(feed)
        assert self._bound is not None
        with torch.cuda.stream(self._stream):
            self._execute()
            logits = self._bound[2][self._outputs[0]].float().cpu()  # waits for the stream
        return logits.numpy()

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
        del self._context
        del self._loaded
