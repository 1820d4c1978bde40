"""Baselines every search is compared against: uniform pruning and random policies.

`UniformAgent` is plain uniform pruning, its keep ratio found by bisection (on measured latency
for a budget, on validation accuracy for a floor); `RandomAgent` draws keep ratios and
precisions at random. Both evaluate through `Agent.evaluate`, like the RL agents, and save a
small JSON state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import Agent
from agents.bisection import TOLERANCE, AnchorSearch
from agents.env import build_policy, decision_units
from agents.precisions import ordered_precisions
from pipeline.core.artifacts import write_json
from pipeline.core.errors import ConfigError
from pipeline.core.policy import Policy, Precision
from pipeline.core.space import CandidateResult, EpisodeCallback

STATE_FILE = "agent.json"


def read_state(folder: Path, name: str) -> dict[str, Any]:
    """The JSON state an agent called `name` saved in `folder`.

    Raises:
        ConfigError: the folder holds no agent state, or another agent's.
    """
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot resume agent '{name}': {path} is unreadable ({exc})") from None
    if state.get("agent") != name:
        raise ConfigError(
            f"cannot resume agent '{name}' from {folder}: it holds the state of agent "
            f"'{state.get('agent')}'; resume with that agent or start a new run"
        )
    return state


class UniformAgent(Agent):
    """The same keep ratio for every prunable layer, all in one precision, found by bisection
    (`agents.bisection`): with a budget or an accuracy floor, one bisection in the precision
    the original measured fastest in and one in the next wider precision, keeping the better
    for the objective; without either, a sweep of evenly spaced ratios in the fastest.
    """

    name = "uniform"
    TOLERANCE = TOLERANCE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchors = AnchorSearch(self.space)

    def _search_impl(self, episodes: int, on_episode: EpisodeCallback) -> None:
        while self.episodes_done < episodes:
            step = self.anchors.next(episodes)
            if step is None:
                return
            bisection, keep = step
            result, _reward = self.evaluate(bisection.policy(keep), on_episode)
            ok = result.ok
            bisection.record(
                keep, result.latency_ms if ok else None, result.accuracy if ok else None
            )

    def best_keep(self) -> float | None:
        """The keep ratio found for the objective, in `prune_precision`."""
        return self.anchors.best_keep()

    def prune_precision(self) -> Precision:
        return self.anchors.precision()

    def save(self, folder: Path) -> None:
        write_json(
            Path(folder) / STATE_FILE,
            {
                "agent": self.name,
                "episodes_done": self.episodes_done,
                "bisections": self.anchors.state(),
            },
        )

    def load(self, folder: Path) -> None:
        state = read_state(folder, self.name)
        self.episodes_done = int(state["episodes_done"])
        saved = state.get("bisections")
        if saved is None:  # saved before anchors: one bracket
            saved = {"bracket": state["bracket"], "results": state["results"]}
        self.anchors.restore(saved)


class RandomAgent(Agent):
    """Random keep ratios (uniform in [min_keep, 1]) per coupling group and random allowed
    precisions per unit, from a seeded NumPy generator whose state is saved for resume.

    With several workers, a candidate is drawn whenever a worker is free; they are drawn in
    the same order whatever the worker count, so every worker count evaluates the same
    candidates. Those drawn but not yet reported are saved with the generator, so a resumed
    search evaluates them next.
    """

    name = "random"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.units = decision_units(self.space)
        self.precisions = ordered_precisions(self.space)
        self.rng = np.random.default_rng(self.seed)
        self.pending: list[Policy] = []  # drawn, not yet reported

    def sample(self) -> Policy:
        """One random policy (non-prunable units keep everything; build_policy sees to it)."""
        low = float(min(max(self.space.min_keep, 1e-3), 1.0))
        keeps = self.rng.uniform(low, 1.0, size=len(self.units)).tolist()
        picks = self.rng.integers(0, len(self.precisions), size=len(self.units))
        return build_policy(self.space, self.units, keeps, [self.precisions[i] for i in picks])

    def _search_impl(self, episodes: int, on_episode: EpisodeCallback) -> None:
        def report(result: CandidateResult, reward: float) -> None:
            self.pending.pop(0)  # before on_episode: a checkpoint there must not hold it
            on_episode(result, reward)

        self.evaluate_many(self._candidates(episodes - self.episodes_done), report)

    def _candidates(self, needed: int) -> Iterator[Policy]:
        """Those drawn before a resume first, then new ones, each drawn when a worker is free
        (one at a time locally: draw, evaluate, draw, as a search always did)."""
        resumed = self.pending[:needed]
        yield from resumed
        for _ in range(needed - len(resumed)):
            policy = self.sample()
            self.pending.append(policy)
            yield policy

    def save(self, folder: Path) -> None:
        state = {
            "agent": self.name,
            "episodes_done": self.episodes_done,
            "rng": self.rng.bit_generator.state,
            "pending": [p.to_dict() for p in self.pending],
        }
        write_json(Path(folder) / STATE_FILE, state)

    def load(self, folder: Path) -> None:
        state = read_state(folder, self.name)
        self.episodes_done = int(state["episodes_done"])
        self.rng.bit_generator.state = state["rng"]
        self.pending = [Policy.from_dict(p, "saved random agent") for p in state.get("pending", [])]
