"""ONNX Runtime on the CPU: the runner of profiles with `runtime: onnxruntime-cpu`."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from pipeline.core.errors import ModelError, first_line
from pipeline.measure.runners.base import Runner
from pipeline.measure.runners.registry import register_runner

# ORT's own exception types do not derive from RuntimeError; catch them by name.
_ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(_ort_state, name)
    for name in (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    if hasattr(_ort_state, name)
)


@register_runner("onnxruntime-cpu")
class OrtCpuRunner(Runner):
    """An `InferenceSession` on `CPUExecutionProvider` with the profile's thread count.

    Intra-op threads are pinned to `profile.threads` and inter-op to 1 with sequential
    execution, so a measurement uses exactly the parallelism the target will have.
    """

    suffixes = (".onnx",)

    def _activate_impl(self) -> None:
        try:
            session = ort.InferenceSession(
                str(self.artifact),
                sess_options=self._session_options(),
                providers=["CPUExecutionProvider"],
            )
        except _ORT_ERRORS as exc:
            raise ModelError(
                f"{self.artifact}: onnxruntime cannot load it: {first_line(exc)}"
            ) from exc
        inputs = session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ModelError(
                f"{self.artifact}: expected one image input, found {len(inputs)} ({names})"
            )
        self._session = session
        self._input_name = inputs[0].name
        # The first output is the logits; exporters write it first (named "logits").
        self._output_name = session.get_outputs()[0].name

    def _session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.profile.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT's warnings would flood the CLI
        return opts

    def _infer_impl(self, feed: np.ndarray) -> np.ndarray:
        try:
            (out,) = self._session.run([self._output_name], {self._input_name: feed})
        except _ORT_ERRORS as exc:
            raise ModelError(
                f"{self.artifact}: onnxruntime cannot run it on an input of shape "
                f"{tuple(feed.shape)}: {first_line(exc)}"
            ) from exc
        return out

    def _deactivate_impl(self) -> None:
        del self._session

    @property
    def session(self) -> ort.InferenceSession:
        """The live session (for inspection, e.g. of its options); only while active."""
        self._require_active("session")
        return self._session
