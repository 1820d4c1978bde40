"""What the Stable-Baselines3 agents share: scoring candidates from inside the env, learning up
to an exact number of candidates, and saving state for resume.

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
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger

from agents.base import Agent
from agents.baselines import STATE_FILE, read_state
from agents.env import CompressionEnv
from agents.vec_env import BatchVecEnv, EnvFactory
from pipeline.core.artifacts import atomic_write_with, write_json
from pipeline.core.policy import LayerAction, Policy, Precision
from pipeline.core.space import EpisodeCallback

POLICY_NET = {"net_arch": [64, 64]}  # the observation is 16 numbers: a small MLP is plenty


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


class SB3Agent(Agent):
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
