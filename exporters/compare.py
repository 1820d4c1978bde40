"""Compare a deployed artifact's logits with a reference, Polygraphy style.

The result is a JSON-ready record and one boolean: no NaN / inf, enough top-1 agreement, and the
logits within an absolute *or* a relative tolerance (chosen per precision by the profile).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError, ModelError
from pipeline.core.profile import Tolerance
from pipeline.model.evaluate import batched_logits, eval_batch_size

_TINY = 1e-12  # floor of a sample's logit scale, so an all-zero reference cannot divide by zero


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing candidate logits with reference logits.

    Error fields are +inf when the candidate (or the reference) holds NaN / inf; `to_dict()`
    writes those as null so the record stays valid JSON. `nan_count` / `inf_count` count the
    candidate's non-finite logits (the reference's make `nan_or_inf` true as well).
    """

    passed: bool
    top1_agreement: float
    reference_accuracy: float | None
    candidate_accuracy: float | None
    max_abs_error: float
    mean_abs_error: float
    median_abs_error: float
    max_rel_error: float
    p99_abs_error: float
    # per-image largest abs / rel error at the tolerance's `error_quantile` (what it judges)
    judged_abs_error: float
    judged_rel_error: float
    nan_or_inf: bool
    nan_count: int = 0
    inf_count: int = 0
    tolerance: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: non-finite floats become None."""
        return {k: _json_safe(v) for k, v in asdict(self).items()}

    def statistics(self) -> dict[str, Any]:
        """The per-output statistics of a validation record (no verdict, no tolerance)."""
        record = self.to_dict()
        return {k: record[k] for k in STATISTICS}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def compare_logits(
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray | None,
    tolerance: Tolerance,
) -> Comparison:
    """Compare two (N, classes) logit arrays under a tolerance.

    Pass = no NaN / inf, top-1 agreement >= `min_top1_agreement`, and the per-image abs error
    <= atol or the per-image relative error <= rtol, each taken at the tolerance's
    `error_quantile` over the images (1.0: the worst image). A sample's abs error is its
    largest logit error; its relative error is that over the largest |reference logit| of the
    sample, which stays meaningful when some logits are zero.

    Args:
        reference: Logits of the reference (the original or FP32 model), shape (N, classes).
        candidate: Logits of the artifact under test, same shape.
        labels: Ground-truth classes (N,) for the accuracies, or None to skip them.
        tolerance: atol, rtol and min_top1_agreement.

    Returns:
        The Comparison; `reasons` names every check that failed.

    Raises:
        DataError: No samples to compare.
        ModelError: The two arrays differ in shape.
    """
    ref, cand = _as_logits(reference, "reference"), _as_logits(candidate, "candidate")
    if ref.shape != cand.shape:
        raise ModelError(
            f"candidate logits have shape {cand.shape}, reference {ref.shape}: "
            "the artifact does not match the original model's outputs"
        )
    nan_or_inf = not (np.isfinite(ref).all() and np.isfinite(cand).all())
    quantile = tolerance.error_quantile
    errors = _errors(ref, cand, quantile) if not nan_or_inf else dict.fromkeys(ERROR_KEYS, math.inf)
    agreement = float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean())
    reasons = _reasons(nan_or_inf, agreement, errors, tolerance)
    return Comparison(
        passed=not reasons,
        top1_agreement=agreement,
        reference_accuracy=_accuracy(ref, labels),
        candidate_accuracy=_accuracy(cand, labels),
        nan_or_inf=nan_or_inf,
        nan_count=int(np.isnan(cand).sum()),
        inf_count=int(np.isinf(cand).sum()),
        tolerance=tolerance.model_dump(),
        reasons=reasons,
        **errors,
    )


ERROR_KEYS = (
    "max_abs_error",
    "mean_abs_error",
    "median_abs_error",
    "max_rel_error",
    "p99_abs_error",
    "judged_abs_error",
    "judged_rel_error",
)
STATISTICS = (*ERROR_KEYS, "top1_agreement", "nan_or_inf", "nan_count", "inf_count")


def _as_logits(array: np.ndarray, what: str) -> np.ndarray:
    logits = np.asarray(array, dtype=np.float64)
    if logits.ndim == 1:  # a single-output model: one logit per sample
        logits = logits[:, None]
    if logits.ndim != 2 or len(logits) == 0:
        raise DataError(f"{what} logits must be a non-empty (N, classes) array, got {logits.shape}")
    return logits


def _errors(ref: np.ndarray, cand: np.ndarray, quantile: float) -> dict[str, float]:
    diff = np.abs(cand - ref)  # (N, classes), float64 so float32 rounding does not mask errors
    scale = np.maximum(np.abs(ref).max(axis=1), _TINY)  # (N,)
    per_image = diff.max(axis=1)
    return {
        "max_abs_error": float(diff.max()),
        "mean_abs_error": float(diff.mean()),
        "median_abs_error": float(np.median(diff)),
        "max_rel_error": float((per_image / scale).max()),
        "p99_abs_error": float(np.percentile(diff, 99)),
        "judged_abs_error": float(np.quantile(per_image, quantile)),
        "judged_rel_error": float(np.quantile(per_image / scale, quantile)),
    }


def _reasons(
    nan_or_inf: bool, agreement: float, errors: dict[str, float], tol: Tolerance
) -> list[str]:
    reasons = []
    if nan_or_inf:
        reasons.append("logits contain NaN or inf")
    if agreement < tol.min_top1_agreement:
        reasons.append(f"top-1 agreement {agreement:.4f} < {tol.min_top1_agreement}")
    abs_err, rel_err = errors["judged_abs_error"], errors["judged_rel_error"]
    which = "max" if tol.error_quantile >= 1.0 else f"p{100 * tol.error_quantile:g} per-image"
    if not nan_or_inf and abs_err > tol.atol and rel_err > tol.rtol:
        reasons.append(
            f"{which} abs error {abs_err:.4g} > atol {tol.atol} and "
            f"{which} rel error {rel_err:.4g} > rtol {tol.rtol}"
        )
    return reasons


def _accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (len(logits),):
        raise DataError(f"labels must have shape ({len(logits)},), got {labels.shape}")
    return float((logits.argmax(axis=1) == labels).mean())


def run_onnx(
    path: Path | str, inputs: np.ndarray, threads: int = 1, batch_size: int | None = None
) -> np.ndarray:
    """Logits of an ONNX model on ONNX Runtime's CPU provider.

    Args:
        path: The `.onnx` file.
        inputs: Samples (N, C, H, W).
        threads: Intra-op threads (the comparator does not need speed, only determinism).
        batch_size: Samples per run (default: up to 64, fewer for large inputs); a graph with a
            static batch axis uses its own size, the last chunk padded and the padding dropped.

    Returns:
        float32 logits (N, classes) from the graph's first output.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initializers are noise here
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    dtype = np.float16 if feed.type == "tensor(float16)" else np.float32
    static = feed.shape[0] if isinstance(feed.shape[0], int) else None
    data = np.asarray(inputs, dtype=dtype)

    def infer(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {feed.name: batch})[0]

    batch = static or batch_size or eval_batch_size(data.shape[1:], most=64)
    return batched_logits(infer, data, batch)
