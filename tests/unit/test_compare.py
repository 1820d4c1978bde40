"""The logit comparator: pass/fail rules, edge cases, JSON record, and ONNX Runtime inference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from exporters import compare_logits, export_onnx, run_onnx
from pipeline.core.errors import DataError, ModelError
from pipeline.core.profile import Tolerance

TOL = Tolerance(atol=0.1, rtol=0.05, min_top1_agreement=0.9)


def _logits(n: int = 100, classes: int = 10, seed: int = 0) -> np.ndarray:
    """Logits with a clear winner per sample (margin 5), so small errors keep the argmax."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, classes)).astype(np.float32)
    logits[np.arange(n), np.arange(n) % classes] += 5.0
    return logits


def test_identical_logits_pass():
    ref = _logits()
    labels = ref.argmax(axis=1)
    result = compare_logits(ref, ref.copy(), labels, TOL)
    assert result.passed and result.reasons == []
    assert result.top1_agreement == 1.0
    assert result.max_abs_error == result.mean_abs_error == result.p99_abs_error == 0.0
    assert result.max_rel_error == 0.0
    assert result.reference_accuracy == result.candidate_accuracy == 1.0
    assert result.tolerance == {
        "atol": 0.1,
        "rtol": 0.05,
        "min_top1_agreement": 0.9,
        "error_quantile": 1.0,
    }


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_fails_and_the_record_stays_valid_json(bad):
    ref = _logits()
    cand = ref.copy()
    cand[3, 2] = bad
    result = compare_logits(ref, cand, None, TOL)
    assert not result.passed and result.nan_or_inf
    assert any("NaN or inf" in reason for reason in result.reasons)
    record = result.to_dict()
    assert record["max_abs_error"] is None
    json.dumps(record, allow_nan=False)  # strict JSON: NaN never reaches a report or an agent


def test_nan_in_the_reference_is_also_caught():
    ref = _logits()
    ref[0, 0] = np.nan
    assert compare_logits(ref, _logits(), None, TOL).nan_or_inf


def test_low_top1_agreement_fails_even_within_atol():
    ref = np.zeros((10, 2), np.float32)
    ref[:, 0] = 0.01  # class 0 wins by a hair everywhere
    cand = ref[:, ::-1].copy()  # class 1 wins by a hair: tiny errors, every argmax flipped
    result = compare_logits(ref, cand, None, TOL)
    assert result.max_abs_error <= TOL.atol
    assert not result.passed
    assert result.top1_agreement == 0.0
    assert result.reasons == ["top-1 agreement 0.0000 < 0.9"]


@pytest.mark.parametrize(("agreeing", "passed"), [(90, True), (89, False)])
def test_top1_agreement_boundary(agreeing, passed):
    ref = _logits()
    cand = ref.copy()
    flip = np.arange(100 - agreeing)
    # Swap the winner with another class in the first samples; errors stay huge but the
    # agreement is what this test is about, so give it a loose atol.
    cand[flip] = np.roll(cand[flip], 1, axis=1)
    loose = Tolerance(atol=100.0, rtol=100.0, min_top1_agreement=0.9)
    result = compare_logits(ref, cand, None, loose)
    assert result.top1_agreement == agreeing / 100
    assert result.passed is passed


def _shifted(delta: float, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    ref = _logits() * scale
    cand = ref.copy()
    cand[0, 0] += delta
    return ref, cand


def test_abs_error_exactly_at_atol_passes():
    ref, cand = np.zeros((4, 3)), np.zeros((4, 3))
    cand[1, 2] = 0.1
    ref[:, 0] = cand[:, 0] = 1.0  # same winner everywhere
    result = compare_logits(ref, cand, None, Tolerance(atol=0.1, rtol=1e-9, min_top1_agreement=1))
    assert result.max_abs_error == pytest.approx(0.1)
    assert result.passed


def test_abs_error_over_atol_passes_when_within_rtol():
    # Logits around 1000: an error of 1 is far above atol but only 0.1% of the logit scale.
    ref, cand = _shifted(1.0, scale=1000.0)
    result = compare_logits(ref, cand, None, TOL)
    assert result.max_abs_error > TOL.atol
    assert result.max_rel_error <= TOL.rtol
    assert result.passed


def test_abs_and_rel_error_both_over_fails():
    ref, cand = _shifted(3.0)
    result = compare_logits(ref, cand, None, TOL)
    assert result.top1_agreement >= 0.99
    assert not result.passed
    assert len(result.reasons) == 1 and "atol" in result.reasons[0] and "rtol" in result.reasons[0]


def test_relative_error_is_robust_to_zero_logits():
    ref = np.zeros((3, 4), np.float32)
    result = compare_logits(ref, ref.copy(), None, TOL)
    assert result.max_rel_error == 0.0 and result.passed
    cand = ref.copy()
    cand[0, 0] = 1e-3  # the winner (argmax of all zeros is class 0) stays the winner
    result = compare_logits(ref, cand, None, TOL)
    assert np.isfinite(result.max_rel_error)
    assert result.passed  # the abs error is within atol


def test_relative_error_is_per_sample():
    ref = np.array([[100.0, 0.0], [1.0, 0.0]])
    cand = ref + np.array([[1.0, 0.0], [0.0, 0.5]])
    result = compare_logits(ref, cand, None, TOL)
    # sample 0: 1 / 100; sample 1: 0.5 / 1, so a large sample cannot hide a small one's error
    assert result.max_rel_error == pytest.approx(0.5)


def test_accuracies_and_p99():
    ref = _logits()
    labels = ref.argmax(axis=1)
    labels[:10] = (labels[:10] + 1) % 10
    cand = ref.copy()
    cand[0, 0] += 0.05
    result = compare_logits(ref, cand, labels, TOL)
    assert result.reference_accuracy == result.candidate_accuracy == 0.9
    assert result.max_abs_error == pytest.approx(0.05, abs=1e-5)
    assert result.mean_abs_error == pytest.approx(0.05 / 1000, abs=1e-8)
    assert result.p99_abs_error == 0.0  # one outlier in 1000 errors moves the max, not the p99


def test_shape_mismatch_is_a_model_error():
    with pytest.raises(ModelError, match="shape"):
        compare_logits(_logits(10, 10), _logits(10, 9), None, TOL)


def test_empty_inputs_are_a_data_error():
    empty = np.zeros((0, 10), np.float32)
    with pytest.raises(DataError):
        compare_logits(empty, empty, None, TOL)


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_run_onnx_matches_torch_with_dynamic_and_static_batch(tmp_path):
    torch.manual_seed(0)
    model = _Small().eval()
    path = export_onnx(model, (3, 8, 8), tmp_path / "small.onnx")
    inputs = np.random.default_rng(0).standard_normal((7, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(run_onnx(path, inputs, batch_size=3), expected, atol=1e-5)

    proto = onnx.load(str(path))
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 4  # a static batch of 4
    static = tmp_path / "static.onnx"
    onnx.save(proto, str(static))
    # 7 samples in batches of 4: the last chunk is padded, and the padding dropped.
    got = run_onnx(static, inputs, batch_size=64)
    assert got.shape == (7, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert compare_logits(expected, got, None, TOL).passed


def test_a_quantile_tolerance_forgives_one_outlier_image_but_not_a_broken_share():
    ref = _logits(n=1000)
    cand = ref + 0.01
    cand[7] += np.linspace(0, 1.0, 10)  # one image off by up to 1.0, still the same argmax
    worst = TOL.model_copy(update={"atol": 0.1, "rtol": 0.01})
    assert not compare_logits(ref, cand, None, worst).passed  # the worst image decides
    p99 = worst.model_copy(update={"error_quantile": 0.99})
    result = compare_logits(ref, cand, None, p99)
    assert result.passed and result.max_abs_error == pytest.approx(1.01, abs=1e-5)
    assert result.judged_abs_error == pytest.approx(0.01, abs=1e-5)
    cand[:50] += 0.5  # 5% of the images broken: past the 99th percentile
    failed = compare_logits(ref, cand, None, p99)
    assert not failed.passed and "p99 per-image abs error" in failed.reasons[0]
