"""RunConfig: what to compress, with what data, and how hard to train (strict, typed)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from pipeline.finetune import TrainSpec
from pipeline.schema import StrictModel, parse_model, read_yaml


class FinetuneConfig(StrictModel):
    """The recovery fine-tune after pruning; `kd_weight` > 0 distils from the original."""

    steps: int = Field(300, ge=0)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(64, ge=1)
    kd_weight: float = Field(1.0, ge=0)

    def spec(self, seed: int) -> TrainSpec:
        return TrainSpec(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            kd_weight=self.kd_weight,
            seed=seed,
        )


class RunConfig(StrictModel):
    """Everything about a run that is not the target. CLI flags override these keys."""

    model: str | None = Field(None, description="torchvision name or module:function; none = demo")
    weights: Path | None = None
    num_classes: int | None = Field(None, ge=2)
    data: str | None = Field(None, description="digits | imagefolder:DIR | module:function")
    policy: str = "uniform:0.5"
    budget_ms: float | None = Field(None, gt=0)
    seed: int = 0
    out: Path = Path("runs")
    opset: int = Field(17, ge=17)
    finetune: FinetuneConfig = FinetuneConfig()
    show_progress: bool = True


def load_config(path: Path | None, overrides: dict[str, object]) -> RunConfig:
    """Read a pipeline.yaml (optional) and apply the CLI's non-None overrides on top."""
    data = read_yaml(path, "run config") if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_model(RunConfig, data, str(path) if path else "command line")
