"""Search agents built on Stable-Baselines3: two-stage PPO, DQN with dense rewards, SAC, TD3.

Each agent walks a `CompressionEnv`; the env's last step calls the agent's `evaluate`, which
measures the candidate and reports it. An SB3 callback stops learning right after the candidate
that brings `episodes_done` to the requested total, so a search evaluates exactly that many.
Resume: `save` writes the SB3 model (and replay buffer), the RNG states and `episodes_done`;
after `load`, `search` continues learning (`reset_num_timesteps=False`) up to the new total.
"""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

from agents.base import Agent
from agents.baselines import STATE_FILE, UniformAgent, read_state
from agents.env import CompressionEnv, ordered_precisions, search_precision
from agents.vec_env import BatchVecEnv, EnvFactory
from pipeline.core.artifacts import atomic_write_with, write_json
from pipeline.core.policy import LayerAction, Policy, Precision
from pipeline.core.space import EpisodeCallback

_NET = {"net_arch": [64, 64]}  # the observation is 16 numbers: a small MLP is plenty


class _StopAfterEpisodes(BaseCallback):
    """Stops `learn` once the agent has evaluated `target` candidates in total."""

    def __init__(self, agent: Agent, target: int) -> None:
        super().__init__()
        self.agent, self.target = agent, target

    def _on_step(self) -> bool:
        return self.agent.episodes_done < self.target


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch global RNG states as JSON-ready data (SB3 draws from all three)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate((3, tuple(state["python"]), None))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class _SB3Agent(Agent):
    """What the SB3 agents share: scoring candidates, learning until a total, saving state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_episode: EpisodeCallback | None = None
        self._target = 0  # the episode count the current `learn` stops at
        self.last_result: Any = None

    def _score(self, policy: Policy) -> float:
        """The env's `evaluate_fn`: evaluate, report through `on_episode`, return the reward."""
        if self._on_episode is None:
            raise RuntimeError("the env stepped outside search(): no on_episode callback")
        self.last_result, reward = self.evaluate(policy, self._on_episode)
        self._scored(policy, self.last_result, reward)
        return reward

    def _score_many(self, policies: list[Policy]) -> list[float]:
        """BatchVecEnv's `score_many`: the candidates of episodes that ended together.

        Those past the search's total are not evaluated: learning stops on this very step,
        before their transitions are stored, so their stand-in reward of 0 is never learnt.
        """
        if self._on_episode is None:
            raise RuntimeError("the env stepped outside search(): no on_episode callback")
        wanted = policies[: max(self._target - self.episodes_done, 0)]
        scored = self.evaluate_many(wanted, self._on_episode)
        for policy, (result, reward) in zip(wanted, scored, strict=True):
            self.last_result = result
            self._scored(policy, result, reward)
        return [reward for _, reward in scored] + [0.0] * (len(policies) - len(scored))

    def _scored(self, policy: Policy, result: Any, reward: float) -> None:
        """Hook: a candidate of this agent was evaluated and rewarded."""

    def _make_env(self, build: EnvFactory) -> CompressionEnv | BatchVecEnv:
        """One env, or with several workers one per worker, stepped together."""
        if self.workers == 1:
            return build(self._score)
        return BatchVecEnv(build, self.workers, self._score_many)

    def _tensorboard_dir(self) -> str | None:
        """TensorBoard logs under log_dir, only when tensorboard is installed (SB3 needs it)."""
        if self.log_dir is None or importlib.util.find_spec("tensorboard") is None:
            return None
        return str(Path(self.log_dir) / "tensorboard")

    def _learn(
        self, model: BaseAlgorithm, env: CompressionEnv | BatchVecEnv, target: int, tag: str
    ) -> None:
        """Learn until `episodes_done` reaches `target`; counters carry over between calls."""
        remaining = target - self.episodes_done
        if remaining <= 0:
            return
        self._target = target
        # Episodes have a fixed length and end together in every env, so this is `remaining`
        # episodes rounded up to whole rounds; the callback is what stops at the candidate
        # count (PPO collects whole rollouts of n_steps).
        rounds = math.ceil(remaining / self.workers)
        if self._tensorboard_dir() is None:
            # SB3's default logger would create an empty SB3-<date> folder in /tmp per call
            model.set_logger(Logger(folder=None, output_formats=[]))
        model.learn(
            total_timesteps=rounds * self.workers * env.episode_length,
            callback=_StopAfterEpisodes(self, target),
            reset_num_timesteps=False,
            tb_log_name=f"{self.name}{tag}",
        )

    def _load_model(self, cls: type[BaseAlgorithm], path: Path, env: CompressionEnv | BatchVecEnv):
        return cls.load(path, env=env, device="cpu", tensorboard_log=self._tensorboard_dir())

    def _write_state(self, folder: Path, extra: dict[str, Any]) -> None:
        state = {"agent": self.name, "episodes_done": self.episodes_done, "rng": rng_state()}
        write_json(Path(folder) / STATE_FILE, {**state, **extra})

    def _read_state(self, folder: Path) -> dict[str, Any]:
        state = read_state(folder, self.name)
        self.episodes_done = int(state["episodes_done"])
        set_rng_state(state["rng"])
        return state


def policy_state(policy: Policy) -> dict[str, list]:
    """{layer: [keep, precision]} with exact floats (Policy.to_dict rounds keep ratios)."""
    return {n: [a.keep_ratio, a.precision.value] for n, a in policy.layers.items()}


def policy_from_state(state: dict[str, list]) -> Policy:
    """The inverse of `policy_state`."""
    return Policy({n: LayerAction(float(k), Precision(p)) for n, (k, p) in state.items()})


def save_model(model: BaseAlgorithm, path: Path) -> None:
    """Write the SB3 model atomically (the temporary name ends in .tmp, so SB3 adds no .zip)."""
    atomic_write_with(path, model.save)


class TwoStagePPO(_SB3Agent):
    """The two-stage DRL paper: PPO chooses keep ratios, then a second PPO chooses precisions.

    Stage 1 (STAGE1_SHARE of the episodes) prunes with every layer in `search_precision`: the
    precision in which the whole original measured fastest on the target (INT8 on a CPU with
    VNNI, FP32 where INT8 does not pay); stage 2 chooses each unit's precision on the best
    stage-1 policy. With a single allowed
    precision there is nothing for stage 2 to choose, and stage 1 gets every episode.

    With a budget, the search opens with a short bisection on measured latency for the uniform
    keep ratio that meets it (at most WARMUP_EPISODES candidates); stage 1's actions then scale
    that ratio per unit (from half to twice it), so PPO starts at a policy that meets the
    budget and learns where to prune more and where less, instead of spending its few episodes
    finding the budget's level (AMC reaches the same end by limiting its actions).

    Stage 2 opens by measuring the best stage-1 policy with every layer in each other precision
    (its "anchors"). Measured here, a graph that is INT8 only in part often runs slower than
    FP32 (every precision boundary adds a Q/DQ pair), while an all-INT8 graph runs much faster:
    a PPO that starts from random per-layer precisions rarely samples the all-INT8 corner.
    When no anchor scores above the best stage-1 policy, stage 2 is skipped and stage 1 goes on
    (`precision_matters`).
    """

    name = "ppo"
    STAGE1_SHARE = 0.6
    WARMUP_EPISODES = 5
    PRECISION_MARGIN = 0.005

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stage = 1
        self._anchors_done = 0
        self.bisection = UniformAgent(self.evaluator, self.reward, self.seed)
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
        """At most how many of `episodes` the opening bisection may use (none without budget)."""
        if self.space.budget_ms is None:
            return 0
        return min(self.WARMUP_EPISODES, episodes // 4)

    @property
    def center(self) -> float | None:
        """The largest uniform keep ratio measured to meet the budget, once there is one."""
        budget = self.space.budget_ms
        met = [k for k, ms in self.bisection.results if ms is not None and budget and ms <= budget]
        return max(met) if met and self.warmup_end is not None else None

    def _warm_up(self, episodes: int) -> None:
        """The opening bisection, through `_score` so its candidates count for stage 1."""
        limit = self.warmup_episodes(episodes)
        while self.warmup_end is None and self.episodes_done < limit:
            keep = self.bisection.next_keep(limit)
            if keep is None:
                break
            self._score(self.bisection.policy(keep))
            ok = self.last_result is not None and self.last_result.ok
            self.bisection.record(keep, self.last_result.latency_ms if ok else None)
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
                precision, center = search_precision(self.space), self.center
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
                learning_rate=3e-4, gamma=0.99, ent_coef=0.01, policy_kwargs=dict(_NET),
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
        default = search_precision(self.space)
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
        extra["bisection"] = {
            "bracket": [self.bisection.low, self.bisection.high],
            "results": [list(r) for r in self.bisection.results],
        }
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
        bisection = state.get("bisection", {"bracket": [self.space.min_keep, 1.0], "results": []})
        self.bisection.low, self.bisection.high = (float(x) for x in bisection["bracket"])
        self.bisection.results = [
            (float(k), None if lat is None else float(lat)) for k, lat in bisection["results"]
        ]
        self.models, self.envs = {}, {}
        for stage in (1, 2):
            path = folder / f"ppo_stage{stage}.zip"
            if path.is_file():
                self.models[stage] = self._load_model(PPO, path, self._env(stage))


class _OffPolicyAgent(_SB3Agent):
    """One SB3 off-policy model over a joint env; its replay buffer is saved for resume."""

    MODEL_FILE, BUFFER_FILE = "model.zip", "replay_buffer.pkl"
    algorithm: type[OffPolicyAlgorithm]
    discrete = False
    dense = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model: OffPolicyAlgorithm | None = None
        proxy = self.evaluator.proxy_accuracy if self.dense else None
        self.env = self._make_env(
            lambda fn: CompressionEnv(
                self.space, fn, mode="joint", discrete=self.discrete, dense=self.dense,
                proxy_fn=proxy,
            )
        )  # fmt: skip

    def _new_model(self) -> OffPolicyAlgorithm:
        raise NotImplementedError

    def _common(self) -> dict[str, Any]:
        """Arguments every off-policy model gets: learn after one episode of random steps."""
        return {
            "learning_starts": self.env.episode_length,
            "train_freq": 1,
            "gradient_steps": 1,
            "policy_kwargs": dict(_NET),  # SB3 adds keys to it: a copy each
            "seed": self.seed,
            "device": "cpu",
            "verbose": 0,
            "tensorboard_log": self._tensorboard_dir(),
        }

    def _search_impl(self, episodes: int, on_episode: EpisodeCallback) -> None:
        self._on_episode = on_episode
        if self.model is None:
            self.model = self._new_model()
        self._learn(self.model, self.env, episodes, "")

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        if self.model is not None:
            save_model(self.model, folder / self.MODEL_FILE)
            atomic_write_with(folder / self.BUFFER_FILE, self.model.save_replay_buffer)
        self._write_state(folder, {})

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        self._read_state(folder)
        self.model = None
        if (folder / self.MODEL_FILE).is_file():
            self.model = self._load_model(self.algorithm, folder / self.MODEL_FILE, self.env)
            if (folder / self.BUFFER_FILE).is_file():
                self.model.load_replay_buffer(folder / self.BUFFER_FILE)


class DQNAgent(_OffPolicyAgent):
    """PuRL: DQN over discrete (keep ratio, precision) pairs with a dense reward per layer.

    Hyperparameters follow PuRL's short-horizon settings: a 400-step buffer, 70% of the search
    exploring, gamma 0.982, target network updated every 15 steps.
    """

    name = "dqn"
    algorithm = DQN
    discrete = True
    dense = True

    def _new_model(self) -> DQN:
        return DQN(
            "MlpPolicy", self.env, buffer_size=400, batch_size=32, learning_rate=1e-3,
            gamma=0.982, target_update_interval=15, exploration_fraction=0.7,
            exploration_final_eps=0.05, **self._common(),
        )  # fmt: skip


class SACAgent(_OffPolicyAgent):
    """AMC-style continuous agent (keep ratio, and precision when several are allowed), SAC."""

    name = "sac"
    algorithm = SAC

    def _new_model(self) -> SAC:
        return SAC(
            "MlpPolicy", self.env, buffer_size=10_000, batch_size=64, learning_rate=3e-4,
            gamma=0.99, tau=0.01, ent_coef="auto", **self._common(),
        )  # fmt: skip


class TD3Agent(_OffPolicyAgent):
    """AMC's DDPG agent in its successor's form (TD3), with Gaussian exploration noise."""

    name = "td3"
    algorithm = TD3
    NOISE_SIGMA = 0.3  # in action units of [-1, 1]; AMC explored with a wide truncated normal

    def _new_model(self) -> TD3:
        size = int(np.prod(self.env.action_space.shape))
        noise = NormalActionNoise(np.zeros(size), self.NOISE_SIGMA * np.ones(size))
        return TD3(
            "MlpPolicy", self.env, buffer_size=10_000, batch_size=64, learning_rate=1e-3,
            gamma=0.99, tau=0.01, action_noise=noise, **self._common(),
        )  # fmt: skip
