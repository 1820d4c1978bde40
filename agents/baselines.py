"""Baselines every search is compared against: uniform pruning and random policies.

`UniformAgent` is plain uniform pruning in the default precision, its keep ratio found by
bisection on measured latency; `RandomAgent` draws keep ratios and precisions at random.
Both evaluate through `Agent.evaluate`, like the RL agents, and save a small JSON state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import Agent
from agents.env import build_policy, decision_units, layer_shares
from agents.precisions import ordered_precisions, precision_factor, search_precision
from pipeline.core.artifacts import write_json
from pipeline.core.choice import holds_floor
from pipeline.core.errors import ConfigError
from pipeline.core.policy import Policy
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


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


Trial = tuple[float, float | None, float | None]
"""A uniform keep ratio tried: (keep, measured latency, validation accuracy); None if failed."""


def read_trials(rows: list[list[Any]]) -> list[Trial]:
    """Saved trials (states saved before accuracies were kept have two fields)."""
    return [
        (float(row[0]), _float_or_none(row[1]), _float_or_none(row[2] if len(row) > 2 else None))
        for row in rows
    ]


class UniformAgent(Agent):
    """The same keep ratio for every prunable layer, all in `search_precision` (the precision in
    which the whole original measured fastest on the target; FP32 when none beats it).

    With a budget: the first keep ratio is the one whose estimated latency matches the budget
    (latency share of the prunable layers scaling with keep**2, since uniform pruning shrinks
    both the inputs and the outputs of inner layers); after that, bisection on the measured
    latency between the largest ratio known to meet the budget and the smallest known to miss
    it. The search ends early once that bracket is narrower than `TOLERANCE` (any further
    candidate would prune to the same channel counts). Without a budget: a sweep of evenly
    spaced ratios from 1.0 down to min_keep, one per episode.
    """

    name = "uniform"
    TOLERANCE = 0.01

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.units = decision_units(self.space)
        self.min_keep = float(min(max(self.space.min_keep, 1e-3), 1.0))
        # The bracket: with a budget, met at low and missed at high; with an accuracy floor,
        # held at high and lost at low (the smallest keep that holds it is the fastest).
        self.low, self.high = self.min_keep, 1.0
        self.results: list[Trial] = []  # (keep, measured latency, validation accuracy)

    def policy(self, keep: float) -> Policy:
        """The uniform policy: every prunable unit keeps `keep`, all in the search precision."""
        precision = search_precision(self.space)
        keeps = [keep] * len(self.units)
        return build_policy(self.space, self.units, keeps, [precision] * len(self.units))

    def estimated_keep(self) -> float:
        """The keep ratio whose estimated latency equals the budget (1.0 without a budget)."""
        budget, original = self.space.budget_ms, self.space.original_latency_ms
        if budget and original:  # the unpruned model in the search precision is the start
            original *= precision_factor(self.space, search_precision(self.space))
        if not budget or not original or budget >= original:
            return 1.0
        shares = layer_shares(self.space)
        prunable = sum(shares[x.name] for x in self.space.prunable)
        if prunable <= 0:
            return self.min_keep
        needed = (budget / original - (1.0 - prunable)) / prunable
        return float(np.clip(math.sqrt(max(needed, 0.0)), self.min_keep, 1.0))

    def next_keep(self, episodes: int) -> float | None:
        """The next keep ratio to evaluate, or None when the bisection has converged."""
        floor = self.space.accuracy_floor
        if self.space.budget_ms is None and floor is None:
            steps = max(episodes - 1, 1)
            return 1.0 - (1.0 - self.min_keep) * min(len(self.results), steps) / steps
        if not self.results:
            return self.estimated_keep() if floor is None else (self.low + self.high) / 2.0
        if self.high - self.low < self.TOLERANCE:
            return None
        return (self.low + self.high) / 2.0

    def record(self, keep: float, latency: float | None, accuracy: float | None = None) -> None:
        """Narrow the bracket with a measured (or failed: None) keep ratio."""
        self.results.append((keep, latency, accuracy))
        floor, budget = self.space.accuracy_floor, self.space.budget_ms
        if floor is not None:
            if latency is not None and accuracy is not None and holds_floor(accuracy, floor):
                self.high = min(self.high, keep)
            else:  # lost the floor, or failed: look at larger networks
                self.low = max(self.low, keep)
                self.high = max(self.high, self.low)
            return
        if budget is None:
            return
        if latency is not None and math.isfinite(latency) and latency <= budget:
            self.low = max(self.low, keep)
        else:  # over budget, or failed: look at smaller networks
            self.high = min(self.high, keep)
            self.low = min(self.low, self.high)

    def _search_impl(self, episodes: int, on_episode: EpisodeCallback) -> None:
        while self.episodes_done < episodes:
            keep = self.next_keep(episodes)
            if keep is None:
                return
            result, _reward = self.evaluate(self.policy(keep), on_episode)
            ok = result.ok
            self.record(keep, result.latency_ms if ok else None, result.accuracy if ok else None)

    def best_keep(self) -> float | None:
        """The keep ratio the bisection found for the objective: the largest measured to meet
        the budget, or with a floor, the smallest that held it (and met any budget)."""
        floor, budget = self.space.accuracy_floor, self.space.budget_ms
        ran = [(k, ms, acc) for k, ms, acc in self.results if ms is not None]
        met = [(k, acc) for k, ms, acc in ran if budget is None or ms <= budget]
        if floor is None:
            return max((k for k, _ in met), default=None) if budget else None
        held = [k for k, acc in met if acc is not None and holds_floor(acc, floor)]
        return min(held, default=None)

    def save(self, folder: Path) -> None:
        write_json(
            Path(folder) / STATE_FILE,
            {
                "agent": self.name,
                "episodes_done": self.episodes_done,
                "bracket": [self.low, self.high],
                "results": [list(r) for r in self.results],
            },
        )

    def load(self, folder: Path) -> None:
        state = read_state(folder, self.name)
        self.episodes_done = int(state["episodes_done"])
        self.low, self.high = (float(x) for x in state["bracket"])
        self.results = read_trials(state["results"])


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
