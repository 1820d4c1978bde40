"""evaluate_candidate on real parts: prune, fine-tune, export, measure in a worker, cache."""

from __future__ import annotations

import numpy as np

from pipeline.core.policy import Policy, Precision, uniform_policy


def test_space_describes_the_model(tiny_evaluator):
    space = tiny_evaluator.space
    names = [layer.name for layer in space.layers]
    assert names[0] == "conv1" and names[-1] == "fc"
    assert not space.layers[-1].prunable
    shares = [layer.latency_share for layer in space.layers]
    assert 0.5 < sum(shares) <= 1.0 + 1e-6
    assert space.original_latency_ms > 0 and 0.5 < space.original_accuracy <= 1.0
    # The residual stream (stem and every block's conv2) is one coupling group.
    group = {layer.name: layer.group for layer in space.layers}
    assert group["layer1.0.conv2"] == group["conv1"] == "conv1"
    # Only layer1.0 keeps its shape (the other stages start with a strided downsample).
    assert space.removable_blocks == ("layer1.0",)
    assert space.budget_ms is not None


def test_the_original_is_measured_in_every_allowed_precision(tiny_evaluator):
    measured = tiny_evaluator.space.precision_latency_ms
    assert set(measured) == {p.value for p in tiny_evaluator.profile.precisions}
    assert measured["fp32"] == tiny_evaluator.space.original_latency_ms
    assert all(ms > 0 for ms in measured.values())
    # Not candidates: the search's measurement counts leave them out.
    assert (tiny_evaluator.real_measurements, tiny_evaluator.cached_measurements) == (0, 0)
    # the unpruned INT8 candidate is judged by the same figure that set the budget
    if "int8" in measured:
        unpruned = uniform_policy(tiny_evaluator.model, 1.0, Precision.INT8)
        result = tiny_evaluator.evaluate(unpruned)
        assert result.source == "cached" and result.latency_ms == measured["int8"]


def test_the_originals_are_measured_in_one_session_and_a_failing_precision_drops_out(
    tmp_path, trained_tiny_resnet, tiny_profile
):
    """The original in each precision: medians over the profile's interleaved rounds; a graph
    that cannot be measured leaves its precision out instead of failing the run."""
    from conftest import TEST_INPUT

    from exporters import export_onnx
    from pipeline.measure.measure_worker import MeasureWorker
    from pipeline.search.build import measure_originals

    original = export_onnx(trained_tiny_resnet, TEST_INPUT, tmp_path / "original.onnx")
    broken = tmp_path / "int8.onnx"
    broken.write_bytes(b"not a graph")
    rounds = tiny_profile.measure.rounds
    with MeasureWorker(tiny_profile, timeout_s=60) as worker:
        session = measure_originals(worker, tiny_profile, original, {Precision.INT8: broken})
    assert set(session) == {Precision.FP32}
    fp32 = session[Precision.FP32]
    assert len(fp32["rounds_ms"]) == rounds
    assert fp32["latency_ms"]["median"] == float(np.median(fp32["rounds_ms"]))


def test_candidate_is_measured_then_cached(tiny_evaluator):
    real, cached = tiny_evaluator.real_measurements, tiny_evaluator.cached_measurements
    lines = len(tiny_evaluator.cache.path.read_text().splitlines())
    policy = uniform_policy(tiny_evaluator.model, 0.5, Precision.INT8)
    first = tiny_evaluator.evaluate(policy)
    assert first.ok and first.source == "measured", first.error
    assert 0.0 < first.accuracy <= 1.0 and first.latency_ms > 0
    again = tiny_evaluator.evaluate(policy)
    assert again.source == "cached" and again.latency_ms == first.latency_ms
    assert again.accuracy == first.accuracy
    counts = (tiny_evaluator.real_measurements - real, tiny_evaluator.cached_measurements - cached)
    assert counts == (1, 1)
    assert len(tiny_evaluator.cache.path.read_text().splitlines()) == lines + 1


def test_an_unpruned_candidate_is_scored_as_trained(tiny_evaluator):
    """A candidate that only sets precisions gets no fine-tune: in FP32 it scores what the
    original scores (a short fine-tune at the recovery rate would only move it off its
    optimum). ONNX Runtime and torch may split a near-tie differently: one sample of slack."""
    result = tiny_evaluator.evaluate(uniform_policy(tiny_evaluator.model, 1.0, Precision.FP32))
    assert result.ok, result.error
    one_sample = 1 / len(tiny_evaluator.val_labels)
    assert abs(result.accuracy - tiny_evaluator.space.original_accuracy) <= one_sample + 1e-9


def test_failing_candidate_is_data_not_an_exception(tiny_evaluator):
    # A measurement that overruns its timeout: the worker is killed, the candidate fails.
    tiny_evaluator.worker.timeout_s = 1e-3
    result = tiny_evaluator.evaluate(uniform_policy(tiny_evaluator.model, 0.75, Precision.FP32))
    assert not result.ok and result.source == "failed"
    assert result.error and "timed out" in result.error
    assert result.accuracy == 0.0 and result.latency_ms is None


def test_proxy_accuracy_drops_when_pruning_without_finetune(tiny_evaluator):
    full = tiny_evaluator.proxy_accuracy(Policy())
    pruned = tiny_evaluator.proxy_accuracy(
        uniform_policy(tiny_evaluator.model, 0.25, Precision.FP32)
    )
    assert full == tiny_evaluator.space.original_accuracy
    assert pruned < full


def test_channel_gate_trains_with_masks(tiny_evaluator):
    import torch

    gate = tiny_evaluator.channel_gate(seed=0)
    assert gate.groups["conv1"] == 64
    masks = {g: torch.ones(n) for g, n in gate.groups.items()}
    correct = gate.step(masks)
    assert correct.dtype == np.bool_ and len(correct) == 64
    masks = {g: torch.zeros(n) for g, n in gate.groups.items()}
    dead = gate.step(masks)  # every channel dropped: the net cannot classify
    assert dead.mean() < 0.5


def test_a_flops_driven_evaluator_measures_nothing(
    tmp_path, trained_tiny_resnet, digits_splits, tiny_profile
):
    """AMC's proxy, for comparison: latency is the original's scaled by the share of MACs, every
    layer stays FP32, and no candidate is measured on the target."""
    from conftest import TEST_INPUT, make_tiny_evaluator

    from pipeline.model.prune import count_macs_params

    evaluator = make_tiny_evaluator(
        trained_tiny_resnet, digits_splits, tiny_profile, tmp_path, latency_source="flops"
    )
    try:
        assert evaluator.space.precisions == (Precision.FP32,)
        assert evaluator.latency_model is None
        result = evaluator.evaluate(uniform_policy(evaluator.model, 0.5, Precision.FP32))
        assert result.ok and result.source == "flops", result.error
        original_macs = count_macs_params(trained_tiny_resnet, TEST_INPUT)[0]
        expected = evaluator.space.original_latency_ms * result.macs / original_macs
        assert result.latency_ms == expected < evaluator.space.original_latency_ms
        assert (evaluator.real_measurements, evaluator.cached_measurements) == (0, 0)
    finally:
        evaluator.close()


def test_a_flops_driven_search_derives_its_budget_from_every_precision(
    tmp_path, trained_tiny_resnet, digits_splits, tiny_profile
):
    """A budget of 0.6 x the fastest precision is the same milliseconds whatever drives the
    search: the FLOPs-driven search stays in FP32, but its budget sees the original in INT8."""
    from conftest import TEST_INPUT, TINY_SPEC

    from exporters import export_onnx
    from pipeline.search.build import build_evaluator

    seen: dict[str, float] = {}

    def budget(original_ms: float, by_precision: dict[str, float]) -> float:
        seen.update(by_precision)
        return 0.6 * min(by_precision.values())

    onnx_path = export_onnx(trained_tiny_resnet, TEST_INPUT, tmp_path / "original.onnx")
    model, splits = trained_tiny_resnet, digits_splits
    evaluator = build_evaluator(
        model, splits, tiny_profile, onnx_path, TINY_SPEC, budget, latency_source="flops"
    )
    try:
        assert set(seen) == {"fp32", "int8"}
        assert evaluator.space.precisions == (Precision.FP32,)
        assert evaluator.space.budget_ms == 0.6 * min(seen.values())
        assert seen["fp32"] == evaluator.space.original_latency_ms
    finally:
        evaluator.close()
