"""Fine-tune: BatchNorm re-estimation, and a run that diverges starting again at a lower rate."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_resnet

from pipeline.core.errors import ModelError
from pipeline.core.train_spec import TrainSpec
from pipeline.model.evaluate import model_accuracy
from pipeline.model.finetune import recalibrate_batchnorm, train


def _scramble_batchnorm(model: torch.nn.Module) -> None:
    """Running statistics far from what the layers produce, as after heavy pruning."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen) * 3)
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.1 + 0.05)


def test_recalibration_restores_accuracy_lost_to_stale_statistics(
    trained_tiny_resnet, digits_splits
) -> None:
    before = model_accuracy(trained_tiny_resnet, digits_splits.val)
    _scramble_batchnorm(trained_tiny_resnet)
    broken = model_accuracy(trained_tiny_resnet, digits_splits.val)
    weights = [p.detach().clone() for p in trained_tiny_resnet.parameters()]
    recalibrate_batchnorm(trained_tiny_resnet, digits_splits.train, batches=10)
    after = model_accuracy(trained_tiny_resnet, digits_splits.val)
    assert broken < before - 0.2  # the scramble really broke it
    assert after >= before - 0.05
    # only statistics move: no weight is trained, and the momentum is restored
    assert all(
        torch.equal(a, b) for a, b in zip(weights, trained_tiny_resnet.parameters(), strict=True)
    )
    norms = [m for m in trained_tiny_resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in norms) and not trained_tiny_resnet.training


def test_a_spec_with_bn_batches_recalibrates_even_without_steps(
    trained_tiny_resnet, digits_splits
) -> None:
    _scramble_batchnorm(trained_tiny_resnet)
    broken = model_accuracy(trained_tiny_resnet, digits_splits.val)
    spec = dataclasses.replace(TrainSpec(), steps=0, bn_batches=10)
    train(trained_tiny_resnet, digits_splits.train, spec, show_progress=False)
    assert model_accuracy(trained_tiny_resnet, digits_splits.val) > broken + 0.2


def test_evaluation_batches_shrink_with_the_input_size() -> None:
    import numpy as np

    from pipeline.model.evaluate import eval_batch_size, torch_logits

    assert eval_batch_size((3, 48, 48)) == 256  # the demo's size: unchanged
    assert eval_batch_size((3, 224, 224)) == 27  # ~16 MB of input per batch, not 150 MB
    assert eval_batch_size((3, 4096, 4096)) == 1
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 224 * 224, 4))
    inputs = np.random.default_rng(0).random((60, 3, 224, 224), dtype=np.float32)
    whole = torch_logits(model, inputs, batch_size=60)
    np.testing.assert_allclose(torch_logits(model, inputs), whole, rtol=1e-5, atol=1e-5)


def test_a_fine_tune_that_diverges_starts_again_at_a_lower_learning_rate(
    digits_splits, caplog
) -> None:
    model = make_tiny_resnet()
    # lr 1e4 sends this untrained net to inf within 5 steps; lr 1e2 does not
    spec = dataclasses.replace(TrainSpec(), steps=5, lr=1e4)
    with caplog.at_level("WARNING", logger="pipeline.model.finetune"):
        train(model, digits_splits.train, spec, show_progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model_accuracy(model, digits_splits.val) >= 0.0 and not model.training
    retries = [r.getMessage() for r in caplog.records]
    assert retries == [
        "fine-tune diverged at lr 10000; starting again at lr 1000",
        "fine-tune diverged at lr 1000; starting again at lr 100",
    ]


def test_a_fine_tune_that_diverges_at_every_learning_rate_is_a_model_error(
    digits_splits,
) -> None:
    model = make_tiny_resnet()
    start = [p.detach().clone() for p in model.parameters()]
    spec = dataclasses.replace(TrainSpec(), steps=5, lr=1e6)
    with pytest.raises(ModelError, match=r"diverged .* from 1e\+06 down to 1000"):
        train(model, digits_splits.train, spec, show_progress=False)
    # the caller gets its model back as it was, not half-way to inf
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))


def test_a_large_batch_is_trained_in_chunks_with_the_same_gradient(monkeypatch) -> None:
    from pipeline.model import finetune
    from pipeline.model.finetune import backward_in_chunks, distillation_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 5, (10,))
    whole = distillation_loss(model(x), y, teacher(x).detach(), 0.5)
    whole.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    monkeypatch.setattr(finetune, "TRAIN_CHUNK_VALUES", 4 * 3 * 8 * 8)  # 4 images a chunk
    loss = backward_in_chunks(model, x, y, teacher, 0.5)
    assert seen == [4, 4, 2]
    assert loss == pytest.approx(whole.item(), rel=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
