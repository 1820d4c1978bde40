"""ONNX Runtime with its TensorRT execution provider: the runner of `runtime: onnxruntime-trt`.

ONNX Runtime hands the graph (or the parts TensorRT supports) to TensorRT and runs the rest with
CUDA. Engines and timing caches go to a folder beside the artifact (`model.ort-trt-cache/`), so
the second session on the same graph loads the engine instead of building it. The provider
builds weakly typed networks, so FP16 and INT8 are switched on only when the graph itself holds
float16 tensors or Q/DQ nodes: an FP32 graph is never quietly run in lower precision.
Timing works as in `onnxruntime-cuda`: input and output live on the GPU, device work is timed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from exporters.tensorrt import (
    DEFAULT_WORKSPACE_BYTES,
    ShapeRange,
    profile_shapes,
    tensorrt_unavailable_reason,
)
from pipeline.core.errors import ModelError
from pipeline.measure.runners.ort_cuda import (
    CPU_EP,
    CUDA_EP,
    DEVICE_ID,
    OrtCudaRunner,
    cuda_provider_options,
)
from pipeline.measure.runners.registry import register_runner

TRT_EP = "TensorrtExecutionProvider"
CACHE_SUFFIX = ".ort-trt-cache"

_INT8_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm"}
)
_FP16 = onnx.TensorProto.FLOAT16


def graph_precisions(model: onnx.ModelProto) -> set[str]:
    """The low precisions a graph asks for: "int8" (Q/DQ or QLinear nodes), "fp16" (float16
    tensors: initializers, Casts to float16, typed inputs, outputs or value_infos)."""
    graph = model.graph
    found: set[str] = set()
    if any(n.op_type in _INT8_OPS for n in graph.node):
        found.add("int8")
    typed = (*graph.input, *graph.output, *graph.value_info)
    if (
        any(t.data_type == _FP16 for t in graph.initializer)
        or any(v.type.tensor_type.elem_type == _FP16 for v in typed)
        or any(_casts_to_fp16(n) for n in graph.node)
    ):
        found.add("fp16")
    return found


def _casts_to_fp16(node: onnx.NodeProto) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == _FP16 for a in node.attribute)


def graph_input(model: onnx.ModelProto) -> tuple[str, list[int]]:
    """Name and dims (-1 for dynamic axes) of the graph's image input.

    Raises:
        ModelError: The graph does not have exactly one input.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelError(f"expected one image input, the graph has {len(inputs)} ({names})")
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
        for d in inputs[0].type.tensor_type.shape.dim
    ]
    return inputs[0].name, dims


def trt_provider_options(
    input_name: str, ranges: ShapeRange, cache_dir: Path, precisions: set[str]
) -> dict[str, str]:
    """TensorRT provider options: engine and timing caches in `cache_dir`, the profile's
    optimisation shapes, FP16 / INT8 only when the graph holds them."""

    def shape(dims: tuple[int, ...]) -> str:
        return f"{input_name}:{'x'.join(str(d) for d in dims)}"

    return {
        "device_id": str(DEVICE_ID),
        "trt_max_workspace_size": str(DEFAULT_WORKSPACE_BYTES),
        "trt_fp16_enable": str("fp16" in precisions),
        "trt_int8_enable": str("int8" in precisions),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": shape(ranges.min),
        "trt_profile_opt_shapes": shape(ranges.opt),
        "trt_profile_max_shapes": shape(ranges.max),
    }


@register_runner("onnxruntime-trt")
class OrtTrtRunner(OrtCudaRunner):
    """An `InferenceSession` on `TensorrtExecutionProvider`, then CUDA, then CPU."""

    suffixes = (".onnx",)
    provider = TRT_EP
    provider_label = "TensorRT"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return super().unavailable_reason() or tensorrt_unavailable_reason()

    @property
    def cache_dir(self) -> Path:
        """Where the provider keeps its engines and timing cache for this artifact."""
        return self.artifact.with_name(self.artifact.stem + CACHE_SUFFIX)

    def _providers(self) -> list[Any]:
        # Importing tensorrt loads its libnvinfer from the wheel, where the provider (which
        # opens the library by name) finds it without LD_LIBRARY_PATH.
        import tensorrt  # noqa: F401

        model = onnx.load(str(self.artifact), load_external_data=False)
        try:
            name, dims = graph_input(model)
            ranges = profile_shapes(name, dims, self.profile.input.shape, self.profile.input.batch)
        except ModelError as exc:
            raise ModelError(f"{self.artifact}: {exc}") from None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        options = trt_provider_options(name, ranges, self.cache_dir, graph_precisions(model))
        return [(TRT_EP, options), (CUDA_EP, cuda_provider_options()), CPU_EP]
