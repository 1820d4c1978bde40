"""ONNX Runtime on an NVIDIA GPU: the runner of profiles with `runtime: onnxruntime-cuda`.

`measure` times only device work: the input is copied to the GPU once (an OrtValue in device
memory bound with an io_binding), the output is preallocated there, and each timed run returns
only once the GPU has finished (ONNX Runtime synchronises its providers at the end of a run, and
the output binding is synchronised again). `infer` is the plain host-to-host path.
Polygraphy's `OnnxrtRunner` does not fit here: it times `session.run` on host arrays, copies to
and from the GPU included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.core.cuda_device import no_cuda_reason
from pipeline.core.errors import ModelError, RuntimeNotAvailable, first_line
from pipeline.measure.runners.base import Runner
from pipeline.measure.runners.ort_cpu import _ORT_ERRORS
from pipeline.measure.runners.registry import register_runner

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
DEVICE_ID = 0
GPU_HINT = "pip install .[gpu], which installs onnxruntime-gpu"

_NP_TYPES: dict[str, Any] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cuda_provider_options() -> dict[str, str]:
    """CUDA provider options: device 0, cuDNN's exhaustive convolution search (the fastest
    kernels, chosen once per shape during warm-up), and no TF32: an FP32 layer in the graph
    computes in FP32, not with TF32's 10-bit mantissa."""
    return {
        "device_id": str(DEVICE_ID),
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": "1",
        "use_tf32": "0",
    }


@register_runner("onnxruntime-cuda")
class OrtCudaRunner(Runner):
    """An `InferenceSession` on `CUDAExecutionProvider` (ops it lacks fall back to the CPU)."""

    suffixes = (".onnx",)
    provider: str = CUDA_EP
    provider_label: str = "CUDA"
    device_type: str = "cuda"  # where io_binding places the timed input and output

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = no_cuda_reason()
        if reason is not None:
            return reason
        if cls.provider not in ort.get_available_providers():
            return (
                f"onnxruntime {ort.__version__} has no {cls.provider_label} execution provider "
                f"({GPU_HINT})"
            )
        return None

    def _providers(self) -> list[Any]:
        return [(CUDA_EP, cuda_provider_options()), CPU_EP]

    def _activate_impl(self) -> None:
        try:
            session = ort.InferenceSession(
                str(self.artifact),
                sess_options=self._session_options(),
                providers=self._providers(),
            )
        except _ORT_ERRORS as exc:
            raise ModelError(
                f"{self.artifact}: onnxruntime cannot load it: {first_line(exc)}"
            ) from exc
        self._check_provider(session)
        inputs = session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ModelError(
                f"{self.artifact}: expected one image input, found {len(inputs)} ({names})"
            )
        output = session.get_outputs()[0]  # the logits: exporters write them first
        self._session = session
        self._input_name, self._output_name = inputs[0].name, output.name
        self._input_type = _NP_TYPES.get(inputs[0].type, np.float32)
        self._output_type = _NP_TYPES.get(output.type, np.float32)
        self._binding: Any = None
        self._bound_feed: np.ndarray | None = None
        self._device_values: tuple[Any, ...] = ()

    def _session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.profile.threads  # for ops that fall back to the CPU
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        return opts

    def _check_provider(self, session: ort.InferenceSession) -> None:
        # A provider that fails to start (missing CUDA, cuDNN or TensorRT libraries) is dropped
        # by ONNX Runtime with only a log line; the CPU would then be measured as the GPU.
        used = session.get_providers()
        if self.provider not in used:
            raise RuntimeNotAvailable(
                f"{self.artifact}: onnxruntime could not start {self.provider} (the session fell "
                f"back to {', '.join(used)}); check that the CUDA, cuDNN and TensorRT libraries "
                "onnxruntime-gpu needs are installed"
            )

    def _infer_impl(self, feed: np.ndarray) -> np.ndarray:
        try:
            (out,) = self._session.run(
                [self._output_name], {self._input_name: feed.astype(self._input_type, copy=False)}
            )
        except _ORT_ERRORS as exc:
            raise ModelError(
                f"{self.artifact}: onnxruntime cannot run it on an input of shape "
                f"{tuple(feed.shape)}: {first_line(exc)}"
            ) from exc
        return np.asarray(out, dtype=np.float32)

    def _bind(self, feed: np.ndarray) -> None:
        """Put `feed` on the GPU and preallocate the output there, once per feed."""
        out_shape = self._infer_impl(feed).shape
        device_in = ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(feed, dtype=self._input_type), self.device_type, DEVICE_ID
        )
        device_out = ort.OrtValue.ortvalue_from_shape_and_type(
            out_shape, self._output_type, self.device_type, DEVICE_ID
        )
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(self._input_name, device_in)
        binding.bind_ortvalue_output(self._output_name, device_out)
        binding.synchronize_inputs()
        self._binding, self._bound_feed = binding, feed
        self._device_values = (device_in, device_out)  # keep the device buffers alive

    def _timed_run_impl(self, feed: np.ndarray) -> None:
        if self._bound_feed is not feed:
            self._bind(feed)
        try:
            self._session.run_with_iobinding(self._binding)
        except _ORT_ERRORS as exc:
            raise ModelError(
                f"{self.artifact}: onnxruntime failed on the GPU: {first_line(exc)}"
            ) from exc
        self._binding.synchronize_outputs()

    def _deactivate_impl(self) -> None:
        self._binding = self._bound_feed = None
        self._device_values = ()
        del self._session

    @property
    def session(self) -> ort.InferenceSession:
        """The live session (e.g. to read `get_providers()`); only while active."""
        self._require_active("session")
        return self._session
