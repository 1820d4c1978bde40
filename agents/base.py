"""The base class of every search agent.

Agents produce Policies (plain data) and receive CandidateResults; they never touch a model.
What they see (the search space, the `Evaluator` protocol, candidate results, reward and
episode callbacks) is defined in `pipeline.core.space`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from agents.precisions import search_precision
from pipeline.core.policy import Policy, Precision
from pipeline.core.space import CandidateResult, EpisodeCallback, Evaluator, RewardFn


class Agent(ABC):
    """A search algorithm. Subclasses implement `_search_impl`, `save` and `load`."""

    name: str = "agent"

    def __init__(
        self, evaluator: Evaluator, reward: RewardFn, seed: int = 0, log_dir: Path | None = None
    ) -> None:
        self.evaluator = evaluator
        self.space = evaluator.space
        self.reward = reward
        self.seed = seed
        self.log_dir = log_dir
        self.episodes_done = 0
        self.total_episodes = 1

    @property
    def workers(self) -> int:
        """Candidates the evaluator takes at once: agents propose up to this many together."""
        return max(int(getattr(self.evaluator, "workers", 1) or 1), 1)

    @property
    def progress(self) -> float:
        """Fraction of the search done, for rewards annealed over the search."""
        return min(self.episodes_done / max(self.total_episodes, 1), 1.0)

    def prune_precision(self) -> Precision:
        """The precision this agent's pruning ran every layer in, for the report and for the
        matched-latency baselines: the one the original measured fastest in unless the agent
        chose another for the objective."""
        return search_precision(self.space)

    def evaluate(
        self, policy: Policy, on_episode: EpisodeCallback
    ) -> tuple[CandidateResult, float]:
        """Evaluate one candidate, score it, report it; every agent goes through here."""
        return self._report(self.evaluator.evaluate(policy), on_episode)

    def evaluate_many(
        self, policies: Iterable[Policy], on_episode: EpisodeCallback
    ) -> list[tuple[CandidateResult, float]]:
        """Evaluate candidates together (at once where the evaluator can), then score and
        report each in submission order, as `evaluate` would have one after another.

        `policies` may be a generator: it is read as the evaluator takes candidates, so an
        agent can draw each one only when a worker is free.
        """
        evaluate_iter = getattr(self.evaluator, "evaluate_iter", None)
        if evaluate_iter is None:
            return [self.evaluate(policy, on_episode) for policy in policies]
        return [self._report(result, on_episode) for result in evaluate_iter(policies)]

    def _report(
        self, result: CandidateResult, on_episode: EpisodeCallback
    ) -> tuple[CandidateResult, float]:
        reward = float(self.reward(result, self.space, self.progress))
        if not np.isfinite(reward):  # NaN never reaches an agent
            reward = -1.0
        self.episodes_done += 1
        on_episode(result, reward)
        return result, reward

    def search(self, episodes: int, on_episode: EpisodeCallback) -> None:
        """Run until `episodes` candidates have been evaluated in total (resume-aware)."""
        self.total_episodes = episodes
        if self.episodes_done < episodes:
            self._search_impl(episodes, on_episode)

    @abstractmethod
    def _search_impl(self, episodes: int, on_episode: EpisodeCallback) -> None: ...

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write everything needed to continue the search (atomic per file)."""

    @abstractmethod
    def load(self, folder: Path) -> None:
        """Restore from `save`; `episodes_done` included."""
