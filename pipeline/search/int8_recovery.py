"""Recovery of the INT8 layers: post-training quantization, and QAT when it loses too much.

Post-training quantization (PTQ) goes first: export, calibrate, quantize, score on val. When the
INT8 graph loses more val accuracy than the profile allows (`finetune.qat: auto`), or always
(`always`), the model is fine-tuned with its INT8 layers fake-quantized the way the deployed
graph runs them (`pipeline.model.qat`), and the learned steps are written into the Q/DQ graph
through ONNX Runtime's `TensorQuantOverrides`.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.core.artifacts import atomic_copy
from pipeline.core.policy import Policy, Precision, policy_layers
from pipeline.core.profile import TargetProfile
from pipeline.core.train_spec import TrainSpec
from pipeline.model.data import Splits
from pipeline.model.evaluate import accuracy, stack, torch_logits
from pipeline.model.qat import DEFAULT_QAT_SPEC, QatMode, qat_finetune

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    """The outcome of `recover_int8`.

    Attributes:
        model: The float model whose weights the written graph holds (a QAT-tuned copy when
            QAT was used, else the model given).
        quantization: `quantize_onnx`'s report for the written graph.
        info: For report.json: `method` ("none": no INT8 layer, "ptq" or "qat"), `mode`, and
            with INT8 layers `float_accuracy`, `ptq_accuracy`, `qat_accuracy` (None when QAT
            did not run), `ptq_drop`, `max_accuracy_drop`, `qat_steps`, `learned_scales`
            (tensors whose step QAT set). Accuracies: val split, the graph on ONNX Runtime CPU.
        qparams: With QAT, the learned steps {layer fqn -> {"input" | "output" -> (scale, zero
            point)}}; `pipeline.model.fake_quant.fake_quantized_logits` rebuilds from them what the
            graph computes.
    """

    model: nn.Module
    quantization: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    qparams: dict[str, dict[str, tuple[float, int]]] | None = None


@dataclass
class _Job:
    """What PTQ and QAT share within one `recover_int8` call."""

    teacher: nn.Module | None
    precisions: dict[str, Precision]
    profile: TargetProfile
    splits: Splits
    spec: TrainSpec
    opset: int
    work: Path
    val: tuple[np.ndarray, np.ndarray]

    @property
    def int8(self) -> list[str]:
        return [n for n, p in self.precisions.items() if p == Precision.INT8]

    def calib(self) -> np.ndarray:
        return stack(self.splits.calib)[0][: self.profile.int8.calib_samples]

    def export(
        self, model: nn.Module, name: str, overrides: dict | None = None
    ) -> tuple[Path, Path, dict[str, Any]]:
        """(fp32 graph, graph with the policy's precisions, quantization report)."""
        from pipeline.search.materialize import export_graph

        fp32, out = self.work / f"{name}_fp32.onnx", self.work / f"{name}.onnx"
        report = export_graph(
            model, self.precisions, self.profile, out, self.calib(), self.opset, fp32, overrides
        )
        return fp32, out, report

    def accuracy(self, path: Path) -> float:
        from exporters import run_onnx

        inputs, labels = self.val
        return accuracy(run_onnx(path, inputs, threads=self.profile.threads), labels)


def recover_int8(
    model: nn.Module,
    teacher: nn.Module | None,
    policy: Policy,
    profile: TargetProfile,
    splits: Splits,
    out_path: Path,
    *,
    mode: QatMode = "auto",
    spec: TrainSpec = DEFAULT_QAT_SPEC,
    fp32_path: Path | None = None,
    opset: int = 17,
    notify: Callable[[str], None] | None = None,
) -> Recovery:
    """Write the deployed graph with the policy's precisions, recovering INT8 with QAT if needed.

    Args:
        model: The pruned, fine-tuned float model (not changed).
        teacher: The original model for distillation during QAT (None: labels only).
        policy: Per-layer precisions; FP16 and FP32 layers are written as `quantize_onnx` does.
        profile: The target: INT8 scheme and calibration, `max_accuracy_drop`, input shape.
        splits: train (QAT), calib (calibration), val (the PTQ-or-QAT decision).
        out_path: Where the deployed graph goes (written atomically).
        mode: "auto": QAT when PTQ's val accuracy drop exceeds `profile.max_accuracy_drop`,
            kept only if it scores above PTQ; "always": QAT is used; "never": PTQ only.
        spec: QAT steps, learning rate, batch size, distillation weight, seed.
        fp32_path: If given, receives the FP32 export of the returned model (the run compares
            its latency with the policy's precisions).
        opset: ONNX opset of the export.
        notify: Called with a one-line message when QAT starts (the CLI's stage display).

    Returns:
        The Recovery: model, quantization report, and the record for report.json.
    """
    precisions = {n: policy.action(n).precision for n in policy_layers(model)}
    with tempfile.TemporaryDirectory(prefix="recover-") as tmp:
        job = _Job(teacher, precisions, profile, splits, spec, opset, Path(tmp), stack(splits.val))
        fp32, graph, report = job.export(model, "ptq")
        info: dict[str, Any] = {"method": "ptq" if job.int8 else "none", "mode": mode}
        recovery = Recovery(model, report, info)
        if job.int8:
            info |= _ptq_record(job, model, graph)
        if _wants_qat(info):
            if notify is not None:
                notify(
                    f"INT8 after calibration: val accuracy {info['ptq_accuracy']:.2%} (float "
                    f"{info['float_accuracy']:.2%}); quantization-aware fine-tune, "
                    f"{spec.steps} steps"
                )
            student, qparams, (qat_fp32, qat_graph, qat_report) = _qat(job, model, info)
            if info["method"] == "qat":
                recovery = Recovery(student, qat_report, info, qparams)
                fp32, graph = qat_fp32, qat_graph
        atomic_copy(graph, Path(out_path))
        if fp32_path is not None:
            shutil.copyfile(fp32, fp32_path)
    return recovery


def _wants_qat(info: dict[str, Any]) -> bool:
    if info["method"] == "none" or info["mode"] == "never":
        return False
    return info["mode"] == "always" or info["ptq_drop"] > info["max_accuracy_drop"]


def _ptq_record(job: _Job, model: nn.Module, graph: Path) -> dict[str, Any]:
    inputs, labels = job.val
    float_acc = accuracy(torch_logits(model, inputs), labels)
    ptq_acc = job.accuracy(graph)
    return {
        "float_accuracy": float_acc,
        "ptq_accuracy": ptq_acc,
        "qat_accuracy": None,
        "ptq_drop": float_acc - ptq_acc,
        "max_accuracy_drop": job.profile.max_accuracy_drop,
        "qat_steps": 0,
        "learned_scales": [],
    }


def _qat(
    job: _Job, model: nn.Module, info: dict[str, Any]
) -> tuple[nn.Module, dict[str, dict[str, tuple[float, int]]], tuple[Path, Path, dict[str, Any]]]:
    """Fine-tune a copy with fake quantization and export it; `info["method"]` says whether
    it is kept ("qat": always, or in auto mode when it scores above PTQ)."""
    student = copy.deepcopy(model)
    qparams = qat_finetune(
        student, job.teacher, job.int8, job.profile.int8, job.splits, job.calib(), job.spec
    )
    exported = job.export(student, "qat", qparams)
    qat_acc = job.accuracy(exported[1])
    info |= {
        "qat_accuracy": qat_acc,
        "qat_steps": job.spec.steps,
        "learned_scales": exported[2]["activation_overrides"],
    }
    if info["mode"] == "always" or qat_acc > info["ptq_accuracy"]:
        info["method"] = "qat"
    else:
        log.info(
            "QAT scored %.4f, not above PTQ's %.4f: keeping PTQ", qat_acc, info["ptq_accuracy"]
        )
    return student.eval(), qparams, exported
