"""The two-stage PPO search: PPO prunes first, then a second PPO chooses per-layer precisions.

Apart from the off-policy agents (`agents.sb3_agents`) because it runs two models in turn, with
an opening bisection before the first and precision anchors between them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO

from agents.bisection import AnchorSearch
from agents.env import CompressionEnv
from agents.precisions import ordered_precisions
from agents.sb3_base import POLICY_NET, SB3Agent, policy_from_state, policy_state, save_model
from agents.vec_env import BatchVecEnv
from pipeline.core.policy import LayerAction, Policy, Precision
from pipeline.core.space import EpisodeCallback


class TwoStagePPO(SB3Agent):
    """The two-stage DRL paper: PPO chooses keep ratios, then a second PPO chooses precisions.

    Stage 1 (STAGE1_SHARE of the episodes) prunes with every layer in one precision: the
    opening bisections' better anchor (below), else the one in which the whole original
    measured fastest on the target (INT8 on a CPU with VNNI, FP32 where INT8 does not pay);
    stage 2 chooses each unit's precision on the best stage-1 policy. With a single allowed
    precision there is nothing for stage 2 to choose, and stage 1 gets every episode.

    With a budget or an accuracy floor, the search opens with short bisections for the uniform
    keep ratio that serves the objective, one per anchor precision (`agents.bisection`: the
    fastest and the next wider; at most WARMUP_EPISODES candidates each); stage 1 then prunes
    in the better anchor's precision, its actions scaling that ratio per unit (from half to
    twice it), so PPO starts at a policy that meets the objective and learns where to prune
    more and where less, instead of spending its few episodes finding the budget's level (AMC
    reaches the same end by limiting its actions).

    Stage 2 opens by measuring the best stage-1 policy with every layer in each other precision
    (its "anchors"). Measured here, a graph that is INT8 only in part often runs slower than
    FP32 (every precision boundary adds a Q/DQ pair), while an all-INT8 graph runs much faster:
    a PPO that starts from random per-layer precisions rarely samples the all-INT8 corner.
    When no anchor scores above the best stage-1 policy, stage 2 is skipped and stage 1 goes on
    (`precision_matters`).
    """

    name = "ppo"
    STAGE1_SHARE = 0.6
    WARMUP_EPISODES = 4
    PRECISION_MARGIN = 0.005

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stage = 1
        self._anchors_done = 0
        self.bisection = AnchorSearch(self.space)
        self.warmup_end: int | None = None  # episodes done when the bisection ended
        self.best_stage1: tuple[float, Policy] | None = None
        self.best_stage1_accuracy: float | None = None
        self.anchor_accuracy: float | None = None  # the best anchor's validation accuracy
        self.models: dict[int, PPO] = {}
        self.envs: dict[int, CompressionEnv | BatchVecEnv] = {}

    def stage1_episodes(self, episodes: int) -> int:
        """How many of `episodes` go to stage 1 (the warm-up's included)."""
        if len(ordered_precisions(self.space)) == 1:
            return episodes
        return min(max(1, math.ceil(self.STAGE1_SHARE * episodes)), episodes)

    def warmup_episodes(self, episodes: int) -> int:
        """At most how many of `episodes` the opening bisections may use (none without a budget
        or an accuracy floor to bisect for)."""
        if self.space.budget_ms is None and self.space.accuracy_floor is None:
            return 0
        return min(self.WARMUP_EPISODES * len(self.bisection.bisections), episodes // 4)

    @property
    def center(self) -> float | None:
        """The uniform keep ratio the opening bisections found for the objective, once they
        ended (`AnchorSearch.best_keep`)."""
        return self.bisection.best_keep() if self.warmup_end is not None else None

    def prune_precision(self) -> Precision:
        """Stage 1's precision: the better anchor's once the opening bisections ended."""
        return self.bisection.precision()

    def _warm_up(self, episodes: int) -> None:
        """The opening bisections, through `_score` so their candidates count for stage 1."""
        limit = self.warmup_episodes(episodes)
        while self.warmup_end is None and self.episodes_done < limit:
            step = self.bisection.next(limit)
            if step is None:
                break
            bisection, keep = step
            self._score(bisection.policy(keep))
            result = self.last_result
            ok = result is not None and result.ok
            latency, accuracy = (result.latency_ms, result.accuracy) if ok else (None, None)
            bisection.record(keep, latency, accuracy)
        if self.warmup_end is None:
            self.warmup_end = self.episodes_done

    def _scored(self, policy: Policy, result: Any, reward: float) -> None:
        if self._stage == 1 and (self.best_stage1 is None or reward > self.best_stage1[0]):
            self.best_stage1 = (reward, policy)
            self.best_stage1_accuracy = float(result.accuracy)

    def precision_matters(self) -> bool:
        """Whether stage 2 can gain anything: some anchor (the best stage-1 pruning in another
        precision) scored more than PRECISION_MARGIN above it. When none does, a per-layer mix
        of precisions cannot raise accuracy either (and mixing adds conversions that cost
        time), so stage 1 gets the remaining episodes."""
        if self.best_stage1_accuracy is None or self.anchor_accuracy is None:
            return True
        return self.anchor_accuracy > self.best_stage1_accuracy + self.PRECISION_MARGIN

    def _env(self, stage: int) -> CompressionEnv | BatchVecEnv:
        if stage not in self.envs:
            if stage == 1:
                precision, center = self.prune_precision(), self.center
                self.envs[stage] = self._make_env(
                    lambda fn: CompressionEnv(
                        self.space, fn, mode="prune", precision=precision, center=center
                    )
                )
            else:
                base = self.best_stage1[1] if self.best_stage1 else Policy()
                self.envs[stage] = self._make_env(
                    lambda fn: CompressionEnv(self.space, fn, mode="precision", base_policy=base)
                )
        return self.envs[stage]

    def _model(self, stage: int) -> PPO:
        if stage not in self.models:
            env = self._env(stage)
            length = max(env.episode_length, 2)
            # An update every two episodes; with several envs, every round of episodes.
            steps = length * max(2 // self.workers, 1)
            self.models[stage] = PPO(
                "MlpPolicy", env, n_steps=steps, batch_size=length, n_epochs=4,
                learning_rate=3e-4, gamma=0.99, ent_coef=0.01, policy_kwargs=dict(POLICY_NET),
                seed=self.seed + stage, device="cpu", verbose=0,
                tensorboard_log=self._tensorboard_dir(),
            )  # fmt: skip
        return self.models[stage]

    def _search_impl(self, episodes: int, on_episode: EpisodeCallback) -> None:
        self._on_episode = on_episode
        split = self.stage1_episodes(episodes)
        if self.episodes_done < split:
            self._stage = 1
            self._warm_up(episodes)
            self._learn(self._model(1), self._env(1), split, "_stage1")
        if self.episodes_done < episodes:
            self._stage = 2
            self._evaluate_anchors(episodes, on_episode)
        if self.episodes_done < episodes and not self.precision_matters():
            self._stage = 1
            self._learn(self._model(1), self._env(1), episodes, "_stage1")
        if self.episodes_done < episodes:
            self._stage = 2
            env = self._env(2)
            if self.best_stage1 is not None:  # stage 1 may have gone on since env was made
                env.set_base_policy(self.best_stage1[1])
            self._learn(self._model(2), env, episodes, "_stage2")

    def anchor_policies(self) -> list[Policy]:
        """The best stage-1 policy with every layer in each other allowed precision."""
        if self.best_stage1 is None:
            return []
        base = self.best_stage1[1]
        default = self.prune_precision()
        return [
            Policy(
                {n: LayerAction(a.keep_ratio, p) for n, a in base.layers.items()},
                base.removed,
                base.channel_scores,
            )
            for p in ordered_precisions(self.space)
            if p != default
        ]

    def _evaluate_anchors(self, episodes: int, on_episode: EpisodeCallback) -> None:
        todo = self.anchor_policies()[self._anchors_done :]
        todo = todo[: max(episodes - self.episodes_done, 0)]
        for start in range(0, len(todo), self.workers):  # anchors are independent: together
            for result, _reward in self.evaluate_many(
                todo[start : start + self.workers], on_episode
            ):
                if result.ok:
                    self.anchor_accuracy = max(self.anchor_accuracy or 0.0, float(result.accuracy))
                self._anchors_done += 1

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        for stage, model in self.models.items():
            save_model(model, folder / f"ppo_stage{stage}.zip")
        best = self.best_stage1
        extra = {"best_stage1": None if best is None else [best[0], policy_state(best[1])]}
        extra["warmup_end"] = self.warmup_end
        extra["accuracy"] = {"stage1": self.best_stage1_accuracy, "anchors": self.anchor_accuracy}
        extra["bisections"] = self.bisection.state()
        self._write_state(folder, {**extra, "stage": self._stage, "anchors": self._anchors_done})

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        state = self._read_state(folder)
        best = state.get("best_stage1")
        self.best_stage1 = None if best is None else (float(best[0]), policy_from_state(best[1]))
        self._stage = int(state.get("stage", 1))
        self._anchors_done = int(state.get("anchors", 0))
        self.warmup_end = state.get("warmup_end")
        accuracies = state.get("accuracy", {})
        self.best_stage1_accuracy = accuracies.get("stage1")
        self.anchor_accuracy = accuracies.get("anchors")
        self.bisection.restore(state.get("bisections") or state.get("bisection") or {})
        self.models, self.envs = {}, {}
        for stage in (1, 2):
            path = folder / f"ppo_stage{stage}.zip"
            if path.is_file():
                self.models[stage] = self._load_model(PPO, path, self._env(stage))
