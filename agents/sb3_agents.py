"""The Stable-Baselines3 off-policy agents: DQN with dense rewards (PuRL), SAC and TD3 (AMC).

Each runs one model over a joint env and saves its replay buffer beside it for resume. What all
SB3 agents share is in `agents.sb3_base`; the two-stage PPO is in `agents.sb3_ppo`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3 import DQN, SAC, TD3
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

from agents.env import CompressionEnv
from agents.sb3_base import POLICY_NET, SB3Agent, save_model
from pipeline.core.artifacts import atomic_write_with
from pipeline.core.space import EpisodeCallback


class _OffPolicyAgent(SB3Agent):
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
            "policy_kwargs": dict(POLICY_NET),  # SB3 adds keys to it: a copy each
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
