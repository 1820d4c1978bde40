"""RunConfig: what to compress, with what data, and how hard to train (strict, typed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.core.errors import ConfigError
from pipeline.core.parallel_config import ParallelConfig
from pipeline.core.schema import StrictModel, parse_model, read_yaml
from pipeline.core.train_spec import TrainSpec


class FinetuneConfig(StrictModel):
    """The recovery fine-tune after pruning; `kd_weight` > 0 distils from the original."""

    steps: int = Field(300, ge=0)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(64, ge=1)
    kd_weight: float = Field(1.0, ge=0)
    qat: Literal["auto", "always", "never"] = Field(
        "auto",
        description="quantization-aware recovery of INT8 layers "
        "(pipeline/search/int8_recovery.py): auto = when post-training INT8 loses more val "
        "accuracy than the profile's max_accuracy_drop",
    )
    qat_steps: int = Field(200, ge=0)
    qat_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the QAT fine-tune")

    def spec(self, seed: int) -> TrainSpec:
        return TrainSpec(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            kd_weight=self.kd_weight,
            seed=seed,
        )

    def qat_spec(self, seed: int) -> TrainSpec:
        """The QAT fine-tune: same batch size and distillation, its own steps and rate."""
        return dataclasses.replace(self.spec(seed), steps=self.qat_steps, lr=self.qat_lr)


class SearchConfig(StrictModel):
    """The policy search: which agent, how many candidates, how each is judged."""

    agent: str = "ppo"
    episodes: int = Field(40, ge=1)
    reward: Literal["budget", "amc", "accuracy"] = "budget"
    budget_fraction: float = Field(
        0.4,
        gt=0,
        le=1,
        description="budget as a fraction of the original's latency, when no "
        "budget_ms is given by the flag, the config or the profile",
    )
    candidate_steps: int = Field(30, ge=0, description="fine-tune steps of each candidate")
    candidate_bn_batches: int = Field(
        0,
        ge=0,
        le=1000,
        description="training batches on which each pruned candidate's BatchNorm statistics are "
        "re-estimated after its fine-tune, before it is scored (0: none)",
    )
    checkpoint_every: int = Field(2, ge=1)
    timeout_s: float = Field(120, gt=0, description="per measurement; a hung runtime is killed")
    allow_over_budget: bool = False
    baselines: bool = True
    matched_accuracy_steps: int = Field(
        0,
        ge=0,
        description="bisection steps (each a full fine-tune, about a minute for the demo) for "
        "uniform baselines at the deployed model's test accuracy; 0 skips them",
    )
    parallel: ParallelConfig = Field(
        ParallelConfig(), description="candidates in flight, here or on a Ray cluster"
    )
    latency_model: bool = Field(
        True,
        description="predict the latency of candidates that cannot change the outcome (clearly "
        "over the budget, or under it and less accurate than the best) instead of measuring them",
    )
    latency_source: Literal["measured", "flops"] = Field(
        "measured",
        description="what the search's latency is: measured on the target, or (for comparison, "
        "as AMC did) the original's latency scaled by the candidate's share of its FLOPs, with "
        "nothing measured and every layer in FP32",
    )


class RunConfig(StrictModel):
    """Everything about a run that is not the target. CLI flags override these keys."""

    model: str | None = Field(None, description="torchvision name or module:function; none = demo")
    weights: Path | None = None
    num_classes: int | None = Field(None, ge=2)
    data: str | None = Field(None, description="digits | imagefolder:DIR | module:function")
    policy: str | None = Field(None, description="a fixed policy instead of the search")
    budget_ms: float | None = Field(None, gt=0)
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=100,
        description="points of test accuracy the shipped model may lose: the search looks for "
        "the fastest policy within it (with budget_ms too, the fastest that also meets the "
        "budget); replaces the profile's max_accuracy_drop for this run",
    )
    input_shape: tuple[int, int, int] | None = Field(
        None, description="channels, height, width of the model's input; default: the profile's"
    )
    seed: int = 0
    out: Path = Path("runs")
    opset: int = Field(17, ge=17)
    finetune: FinetuneConfig = FinetuneConfig()
    search: SearchConfig = SearchConfig()
    show_progress: bool = True


def load_config(
    path: Path | None,
    overrides: dict[str, object],
    sections: dict[str, dict[str, object]] | None = None,
) -> RunConfig:
    """Read a pipeline.yaml (optional) and apply the CLI's non-None overrides on top.

    `sections` holds overrides of nested sections (e.g. {"search": {"agent": "dqn"}}).
    """
    data = read_yaml(path, "run config") if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    for name, values in (sections or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            section = data.get(name) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{path}: '{name}' must be a mapping")
            data[name] = {**section, **given}
    return parse_model(RunConfig, data, str(path) if path else "command line")


def resume_config(run_dir: Path) -> RunConfig:
    """The configuration an interrupted run started with (from its manifest.json)."""
    manifest = Path(run_dir) / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"cannot resume {run_dir}: it has no manifest.json (not a run directory)")
    data = json.loads(manifest.read_text())
    if data.get("status") == "complete":
        raise ConfigError(f"{run_dir} is already complete; nothing to resume")
    return parse_model(RunConfig, data["config"], str(manifest))
