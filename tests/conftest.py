"""Shared fixtures: real digits splits, tiny real ResNets, and an isolated weights cache.

Session-scoped fixtures are built once per test session; those that hand out models return a
fresh copy each time, so a test that prunes or trains one cannot affect another.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.data import Splits, load_data

TEST_INPUT = (3, 32, 32)
NUM_CLASSES = 10


def make_tiny_resnet(num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """A ResNet with one BasicBlock per stage (ResNet-10): real residuals, cheap to run."""
    from torchvision.models.resnet import BasicBlock, ResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes).eval()


@pytest.fixture(scope="session")
def pipeline_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One weights cache for the session, so the demo baseline trains at most once."""
    return tmp_path_factory.mktemp("pipeline-cache")


@pytest.fixture(autouse=True)
def _isolated_pipeline_cache(monkeypatch: pytest.MonkeyPatch, pipeline_cache_dir: Path) -> None:
    # Tests (and CLI subprocesses they start) never write to the user's ~/.cache/pipeline
    monkeypatch.setenv("PIPELINE_CACHE", str(pipeline_cache_dir))


@pytest.fixture(scope="session")
def digits_splits() -> Splits:
    """The embedded digits data at 3x32x32, split with seed 0 (shared: do not modify)."""
    return load_data("digits", TEST_INPUT, seed=0)


@pytest.fixture
def tiny_resnet() -> nn.Module:
    """A fresh, untrained, deterministically initialised ResNet-10 with 10 classes."""
    return make_tiny_resnet()


@pytest.fixture(scope="session")
def _trained_tiny_resnet_state(digits_splits: Splits) -> dict[str, torch.Tensor]:
    from pipeline.finetune import TrainSpec, train

    model = make_tiny_resnet()
    spec = TrainSpec(steps=60, lr=0.05, batch_size=64, schedule="onecycle", seed=0)
    train(model, digits_splits.train, spec, description="tiny resnet", show_progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def trained_tiny_resnet(_trained_tiny_resnet_state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh copy of a ResNet-10 briefly trained on `digits_splits` (well above chance)."""
    model = make_tiny_resnet()
    model.load_state_dict(_trained_tiny_resnet_state)
    return model.eval()
