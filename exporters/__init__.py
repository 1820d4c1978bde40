"""ONNX export, precision-in-graph (Q/DQ INT8, float16 FP16), precision inspection and the
logit comparator.

Importing this package needs neither CUDA nor TensorRT.
"""

from exporters.compare import Comparison, compare_logits, run_onnx
from exporters.fp16 import convert_to_fp16
from exporters.inspect_precision import layer_precisions
from exporters.onnx_export import export_onnx, layer_node_map
from exporters.quantize import quantize_onnx

__all__ = [
    "Comparison",
    "compare_logits",
    "convert_to_fp16",
    "export_onnx",
    "layer_node_map",
    "layer_precisions",
    "quantize_onnx",
    "run_onnx",
]
