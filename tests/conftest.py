"""Shared fixtures: real digits splits, tiny real ResNets, and an isolated weights cache.

Session-scoped fixtures are built once per test session; those that hand out models return a
fresh copy each time, so a test that prunes or trains one cannot affect another.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.core.policy import Precision, uniform_policy
from pipeline.core.space import CandidateResult
from pipeline.core.train_spec import TrainSpec
from pipeline.model.data import load_data
from pipeline.model.splits import Splits


class Collect:
    """on_episode: records every candidate and reward it is handed."""

    def __init__(self) -> None:
        self.results: list[CandidateResult] = []
        self.rewards: list[float] = []

    def __call__(self, result: CandidateResult, reward: float) -> None:
        self.results.append(result)
        self.rewards.append(reward)


TESTS_DIR = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs two workers on two cores: one compute thread each (CLI subprocesses
        # inherit it) instead of four threads contending for two cores.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in a real subprocess; tests/ is importable (for module:function models)."""
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TEST_INPUT = (3, 32, 32)
TINY_SPEC = TrainSpec(steps=5, lr=0.01, batch_size=32, kd_weight=1.0)  # candidates' fine-tune
NUM_CLASSES = 10


def make_tiny_resnet(num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """A ResNet with one BasicBlock per stage (ResNet-10): real residuals, cheap to run."""
    from torchvision.models.resnet import BasicBlock, ResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes).eval()


class FragileNet(nn.Module):
    """A hand-written model with its channel count hard-coded in `forward`, as many are: any
    candidate that prunes `conv2` breaks the forward pass, a real failure the search survives."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.fc(x.reshape(-1, 32))


def make_fragile_net(num_classes: int = NUM_CLASSES) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FragileNet(num_classes).eval()


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
    from pipeline.core.train_spec import TrainSpec
    from pipeline.model.finetune import train

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


TINY_PROFILE = {
    "name": "tiny",
    "description": "tiny CPU target for tests",
    "runtime": "onnxruntime-cpu",
    "precisions": ["int8", "fp32"],
    "input": {"shape": list(TEST_INPUT), "batch": 1},
    "threads": 1,
    "channel_multiple": 8,
    "min_keep_ratio": 0.25,
    "max_accuracy_drop": 0.05,
    "measure": {"warmup": 3, "repeats": 30},
}


@pytest.fixture
def tiny_profile():
    from pipeline.core.profile import TargetProfile

    return TargetProfile.model_validate(TINY_PROFILE)


# Built evaluators' starting points, by model, profile and options: building one measures the
# original in each precision and profiles its layers, seconds that every test would repeat.
_BUILT: dict[str, tuple[Any, dict[str, Any], dict[str, Any] | None]] = {}


def make_tiny_evaluator(model: nn.Module, splits: Splits, profile, folder: Path, **options):
    """A real CandidateEvaluator for `model` on 32x32 digits: each candidate is pruned with
    torch-pruning, fine-tuned 5 steps, exported, measured with ONNX Runtime in a worker
    process. The budget is 70% of the original's measured latency. `options` go to
    `build_evaluator` (latency_model, latency_source).

    The first evaluator of a model, profile and options is built by `build_evaluator`; later
    ones start from its search space, measurements and latency model, as a resumed search
    would, each with its own measuring process and cache file.
    """
    from exporters import export_onnx
    from pipeline.search.build import build_evaluator

    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, TEST_INPUT, folder / "original.onnx")
    key = _built_key(model, profile, options)
    if key in _BUILT:
        return _from_built(model, splits, profile, folder, options, _BUILT[key])
    evaluator = build_evaluator(
        model,
        splits,
        profile,
        onnx_path,
        TINY_SPEC,
        budget_ms=lambda original_ms, _by_precision: 0.7 * original_ms,
        cache=_cache(folder),
        **options,
    )
    model_state = evaluator.latency_model.state() if evaluator.latency_model else None
    model_state = copy.deepcopy(model_state)  # the first evaluator goes on learning
    _BUILT[key] = (evaluator.space, dict(evaluator.cache.entries), model_state)
    return evaluator


def _cache(folder: Path):
    from pipeline.search.measurements import MeasurementCache

    return MeasurementCache(folder / "measurements.jsonl")


def _built_key(model: nn.Module, profile, options: dict[str, Any]) -> str:
    import hashlib
    import json

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    payload = [digest.hexdigest(), profile.model_dump(mode="json"), options]
    return json.dumps(payload, sort_keys=True, default=str)


def _from_built(model, splits, profile, folder: Path, options, built):
    from pipeline.measure.latency_model import LatencyModel
    from pipeline.measure.measure_worker import MeasureWorker
    from pipeline.search.candidate import CandidateEvaluator
    from pipeline.search.latency import MeasuredLatency

    space, entries, model_state = built
    cache = _cache(folder)
    for key, stats in entries.items():
        cache.put(key, stats)
    latency_model = None
    if model_state is not None:
        latency_model = LatencyModel(space)
        latency_model.restore(model_state)
    measured = MeasuredLatency(profile, MeasureWorker(profile), cache, latency_model)
    source = options.get("latency_source", "measured")
    return CandidateEvaluator(
        model, splits, profile, space, TINY_SPEC, latency_source=source, measured=measured
    )


def by_size_measure(evaluator) -> Callable[[Path], dict[str, Any]]:
    """A `MeasureWorker.measure` whose latency is in proportion to the graph's size, the
    unpruned FP32 graph at the original's: what a confirmation or a side-by-side session
    decides then depends on the policies, never on how busy the machine is."""
    with tempfile.TemporaryDirectory() as tmp:
        unpruned = Path(tmp) / "unpruned.onnx"
        evaluator.export_untrained(uniform_policy(evaluator.model, 1.0, Precision.FP32), unpruned)
        unpruned_bytes = unpruned.stat().st_size
    original = evaluator.space.original_latency_ms

    def measure(path: Path) -> dict[str, Any]:
        ms = original * path.stat().st_size / unpruned_bytes
        return {"latency_ms": {"median": ms, "p90": ms}, "floor_ms": None, "noisy": False}

    return measure


@pytest.fixture
def tiny_evaluator(tmp_path: Path, trained_tiny_resnet, digits_splits, tiny_profile):
    """`make_tiny_evaluator` over the trained ResNet-10."""
    evaluator = make_tiny_evaluator(trained_tiny_resnet, digits_splits, tiny_profile, tmp_path)
    yield evaluator
    evaluator.close()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the scale-out tests (skipped without Ray)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()
