"""RunConfig: what to compress, with what data, and how hard to train (strict, typed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.core.errors import ConfigError
from pipeline.core.manifest import MANIFEST, load_manifest
from pipeline.core.parallel_config import ParallelConfig
from pipeline.core.profile import MAX_BUDGET_MS
from pipeline.core.schema import StrictModel, parse_model, read_yaml
from pipeline.core.train_spec import TrainSpec

# Upper bounds of a run's numbers: far beyond any real run, so that a typo is refused in one
# line instead of running for weeks or exhausting memory.
MAX_STEPS = 10_000_000
MAX_BATCH_SIZE = 65_536
MAX_EPISODES = 100_000
MAX_TIMEOUT_S = 86_400.0  # one day per measurement
# Seeds reach numpy, which takes them below 2**32; agents add small offsets to them.
MAX_SEED = 2**31 - 1
# The newest opset torch's exporter writes (it refuses 24 and above)
MAX_OPSET = 23


class FinetuneConfig(StrictModel):
    """The recovery fine-tune after pruning; `kd_weight` > 0 distils from the original."""

    steps: int = Field(300, ge=0, le=MAX_STEPS)
    lr: float = Field(0.01, gt=0, le=100)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE)
    kd_weight: float = Field(1.0, ge=0, le=1000)
    qat: Literal["auto", "always", "never"] = Field(
        "auto",
        description="quantization-aware recovery of INT8 layers "
        "(pipeline/search/int8_recovery.py): auto = when post-training INT8 loses more val "
        "accuracy than the profile's max_accuracy_drop",
    )
    qat_steps: int = Field(200, ge=0, le=MAX_STEPS)
    qat_lr: float = Field(1e-4, gt=0, le=100, description="Adam learning rate of the QAT fine-tune")

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

    agent: str = Field("n2n", max_length=64)
    episodes: int = Field(40, ge=1, le=MAX_EPISODES)
    reward: Literal["budget", "amc", "accuracy"] = "budget"
    budget_fraction: float = Field(
        0.6,
        gt=0,
        le=1,
        description="budget as a fraction of the original's measured latency (see "
        "budget_basis), when no budget_ms is given by the flag, the config or the profile",
    )
    budget_basis: Literal["fastest", "fp32"] = Field(
        "fastest",
        description="what budget_fraction multiplies: 'fastest', the original with every layer "
        "in its fastest allowed precision, measured (so below 1 the budget always calls for "
        "pruning); 'fp32', the original as it is",
    )
    candidate_steps: int = Field(
        30, ge=0, le=MAX_STEPS, description="fine-tune steps of each candidate"
    )
    candidate_bn_batches: int = Field(
        0,
        ge=0,
        le=1000,
        description="training batches on which each pruned candidate's BatchNorm statistics are "
        "re-estimated after its fine-tune, before it is scored (0: none)",
    )
    checkpoint_every: int = Field(2, ge=1, le=MAX_EPISODES)
    timeout_s: float = Field(
        120, gt=0, le=MAX_TIMEOUT_S, description="per measurement; a hung runtime is killed"
    )
    allow_over_budget: bool = False
    baselines: bool = True
    matched_accuracy_steps: int = Field(
        0,
        ge=0,
        le=64,
        description="bisection steps (each a full fine-tune, about a minute for the demo) for "
        "uniform baselines at the deployed model's test accuracy; 0 skips them",
    )
    matched_accuracy_precisions: Literal["search", "all"] = Field(
        "search",
        description="which uniform baselines get that bisection: 'search', the one in the "
        "precision the search pruned in (the harder baseline; FP32 when it pruned in FP32); "
        "'all', every matched-latency one (FP32 too, several more minutes)",
    )
    floor_confidence: float = Field(
        0.9,
        ge=0.5,
        lt=1.0,
        description="under an accuracy floor, how sure (one-sided) a model built in full must "
        "be, judged on validation, to hold the floor on the test set as well; 0.5: the "
        "validation estimate alone",
    )
    descent_steps: int = Field(
        4,
        ge=0,
        le=8,
        description="under an accuracy floor, bisection steps (each a full fine-tune) that "
        "scale the held pick's keep ratios down while it still holds the floor; 0: none",
    )
    descent_groups: int = Field(
        0,
        ge=0,
        le=16,
        description="under an accuracy floor, the descent cuts the pick's layers into this many "
        "runs of about equal latency and shrinks each by what shrinking it alone measured to "
        "save on the target (a run that saves nothing stays); 0 (default): every layer by one "
        "factor",
    )
    budget_aim: float | None = Field(
        0.9,
        gt=0,
        le=1,
        description="under a budget alone, the pick is scaled along its own shape until its "
        "latency, measured beside it, sits within this share of the budget: widened when the "
        "search stopped short, narrowed when it lies in the margin left for the final "
        "measurement, which reads it in another session; null: ship the pick as found",
    )
    recovery_allowance: bool = Field(
        True,
        description="under an accuracy floor, lower the floor candidates' short-fine-tune "
        "scores must hold by what the full recovery added to one uniform probe (one full "
        "fine-tune before the search)",
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

    model: str | None = Field(
        None, max_length=1024, description="torchvision name or module:function; none = demo"
    )
    weights: Path | None = None
    random_init: bool = Field(
        False,
        description="compress a --model without --weights from its random initialisation "
        "(tests and benchmarks); without it a model needs weights",
    )
    num_classes: int | None = Field(None, ge=2, le=1_000_000)
    data: str | None = Field(
        None, max_length=4096, description="digits | imagefolder:DIR | module:function"
    )
    policy: str | None = Field(
        None, max_length=4096, description="a fixed policy instead of the search"
    )
    budget_ms: float | None = Field(None, gt=0, le=MAX_BUDGET_MS)
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
    seed: int = Field(0, ge=0, le=MAX_SEED)
    out: Path = Path("runs")
    opset: int = Field(17, ge=17, le=MAX_OPSET)
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
    source = str(path) if path else "command line"
    config = parse_model(RunConfig, data, source)
    check_combination(config, source)
    return config


def resume_config(run_dir: Path) -> RunConfig:
    """The configuration an interrupted run started with (from its manifest.json)."""
    manifest = load_manifest(run_dir, "cannot resume")
    if manifest.status == "complete":
        raise ConfigError(f"{run_dir} is already complete; nothing to resume")
    return parse_model(RunConfig, manifest.config, f"{run_dir}/{MANIFEST}")


def check_combination(config: RunConfig, source: str) -> None:
    """Refuse settings that would be silently ignored, or a model that would be compressed
    from random weights without anyone asking for it.

    Raises:
        ConfigError: `weights`, `num_classes` or `random_init` without `model`; `random_init`
            with `weights`; a torchvision architecture with neither.
    """
    if config.model is None:
        given = [k for k in ("weights", "num_classes", "random_init") if getattr(config, k)]
        if given:
            raise ConfigError(
                f"{source}: {given[0]} is given without model; it applies to a --model only "
                "(without --model the embedded demo runs with its own trained weights): give "
                "--model too, or drop it"
            )
        return
    if config.random_init and config.weights is not None:
        raise ConfigError(
            f"{source}: random_init and weights are both given; drop one (random_init "
            "compresses the untrained network, weights load a trained one)"
        )
    # A torchvision architecture is built untrained; a module:function may load its own weights
    if ":" not in config.model and config.weights is None and not config.random_init:
        raise ConfigError(
            f"{source}: --model {config.model} has no --weights: it would be compressed from "
            "random weights and score at chance; give --weights FILE, or --random-init to do "
            "so on purpose"
        )
