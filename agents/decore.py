"""DECORE: one REINFORCE agent per channel, trained jointly with the network, budget-aware.

Each coupling group's output channels get one agent apiece (a channel that a skip connection
couples across several layers is one channel of one group, so it gets one shared agent, as DECORE
does for residual blocks). An agent is a single logit w with keep probability sigmoid(w). Every
REINFORCE step samples keep/drop for all channels, trains the network copy of the evaluator's
`channel_gate` for one batch with those masks, and rewards each group's agents with DECORE's
reward: (channels dropped in the group) x (mean over the batch of +1 per correct sample and
-lambda per wrong one).

Our addition: every `steps_per_episode` steps the current keep probabilities become a Policy that
the evaluator prunes, fine-tunes and measures on the target. Lambda is the knob DECORE leaves to
the user; here the measured latency turns it: over budget, lambda falls (dropping is punished
less, so the agents drop more); within budget but with lost accuracy, lambda rises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agents.base import Agent
from agents.precisions import search_precision
from pipeline.core.artifacts import atomic_write_with, write_json
from pipeline.core.errors import ModelError
from pipeline.core.policy import LayerAction, Policy
from pipeline.core.space import (
    CandidateResult,
    ChannelGate,
    ChannelGating,
    EpisodeCallback,
    Evaluator,
    RewardFn,
    require,
)

STATE_VERSION = 1
LAMBDA_RANGE = (0.05, 1000.0)  # keeps lambda positive and finite however long the search runs
ACCURACY_DECAY = 0.9  # moving average of the accuracy term, for the per-agent baseline


class DecoreAgent(Agent):
    """DECORE's per-channel agents with a lambda steered by measured latency.

    Args:
        evaluator: Evaluates policies and provides the masked-training `channel_gate`.
        reward: Scores each evaluated candidate (reported through `on_episode`).
        seed: Seeds action sampling and the gate's data order.
        log_dir: Unused; accepted for the common agent signature.
        steps_per_episode: REINFORCE steps (training batches) between two evaluations (K).
        lr: Adam learning rate of the agents' logits.
        init_logit: Initial w of every agent; sigmoid(3) = 0.95 keeps almost everything.
        lam: Initial penalty per misclassified sample (DECORE's lambda).
        lam_factor: Multiplicative step of the lambda adjustment after each evaluation.
        accuracy_tolerance: Accuracy below the original minus this counts as accuracy lost.
        baseline: Subtract a per-agent leave-one-out baseline (unbiased variance reduction);
            False gives DECORE's plain estimator.
    """

    name = "decore"

    def __init__(
        self,
        evaluator: Evaluator,
        reward: RewardFn,
        seed: int = 0,
        log_dir: Path | None = None,
        *,
        steps_per_episode: int = 20,
        lr: float = 0.1,
        init_logit: float = 3.0,
        lam: float = 5.0,
        lam_factor: float = 1.5,
        accuracy_tolerance: float = 0.01,
        baseline: bool = True,
    ) -> None:
        super().__init__(evaluator, reward, seed, log_dir)
        if steps_per_episode < 1 or lam <= 0 or lam_factor <= 1:
            raise ValueError("need steps_per_episode >= 1, lam > 0 and lam_factor > 1")
        self.steps_per_episode = steps_per_episode
        self.lr = lr
        self.init_logit = init_logit
        self.lam = lam
        self.lam_factor = lam_factor
        self.accuracy_tolerance = accuracy_tolerance
        self.baseline = baseline
        self._accuracy_mean: float | None = None
        self.steps_done = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.logits: dict[str, torch.Tensor] = {}  # group name -> (channels,) leaf tensor
        self._optimizer: torch.optim.Adam | None = None
        self._gate: ChannelGate | None = None

    # ----------------------------------------------------------------------------- search loop

    def _search_impl(self, episodes: int, on_episode: EpisodeCallback) -> None:
        gate = self._ensure_gate()
        while self.episodes_done < episodes:
            # With several workers, `workers` snapshots of the agents, each `steps_per_episode`
            # steps apart, are evaluated together; lambda then follows them a batch late.
            batch = []
            for _ in range(min(self.workers, episodes - self.episodes_done)):
                for _ in range(self.steps_per_episode):
                    self._reinforce_step(gate)
                batch.append(self.current_policy())
            for result, _ in self.evaluate_many(batch, on_episode):
                self._adapt_lambda(result)

    def _ensure_gate(self) -> ChannelGate:
        """Open the masked-training session once; after a resume it restarts from the original.

        The gate's network copy is the evaluator's state, not ours, so it is not saved: a resumed
        search keeps the learned agents but jointly trains a fresh copy (seeded differently so the
        batches do not repeat).
        """
        if self._gate is None:
            require(self.evaluator, ChannelGating, "decore")
            self._gate = self.evaluator.channel_gate(self.seed + self.steps_done)
            groups = dict(self._gate.groups)
            if not self.logits:
                self._init_agents(groups)
            self._check_groups(groups)
        return self._gate

    def _init_agents(self, groups: dict[str, int]) -> None:
        self.logits = {
            g: torch.full((n,), float(self.init_logit), requires_grad=True)
            for g, n in groups.items()
        }
        self._optimizer = torch.optim.Adam(list(self.logits.values()), lr=self.lr)

    def _check_groups(self, groups: dict[str, int]) -> None:
        mine = {g: int(w.numel()) for g, w in self.logits.items()}
        if mine != groups:
            raise ModelError(
                "the saved DECORE agents do not match this model's channel groups "
                f"({len(mine)} saved, {len(groups)} in the model); resume with the same model"
            )

    def _reinforce_step(self, gate: ChannelGate) -> float:
        """One joint training batch and one REINFORCE update; returns the batch accuracy."""
        with torch.no_grad():
            actions = {
                g: torch.bernoulli(torch.sigmoid(w), generator=self.generator)
                for g, w in self.logits.items()
            }  # 1 keep, 0 drop; each (channels,)
        correct = np.asarray(gate.step({g: a.clone() for g, a in actions.items()}), dtype=bool)
        accuracy_term = float(np.where(correct, 1.0, -self.lam).mean()) if correct.size else 0.0
        loss = torch.zeros(())
        for g, w in self.logits.items():
            log_pi = actions[g] * F.logsigmoid(w) + (1.0 - actions[g]) * F.logsigmoid(-w)
            loss = loss - (log_pi * self._advantage(actions[g], accuracy_term)).sum()
        assert self._optimizer is not None
        self._optimizer.zero_grad()
        loss.backward()
        self._optimizer.step()
        previous = accuracy_term if self._accuracy_mean is None else self._accuracy_mean
        self._accuracy_mean = ACCURACY_DECAY * previous + (1.0 - ACCURACY_DECAY) * accuracy_term
        self.steps_done += 1
        return float(correct.mean()) if correct.size else 0.0

    def _advantage(self, keep: torch.Tensor, accuracy_term: float) -> torch.Tensor:
        """Per-agent advantage of DECORE's group reward, shape (channels,).

        DECORE rewards every agent of a group with R = (channels dropped) x (accuracy term).
        From one agent's point of view most of R comes from its neighbours' coin flips, which
        buries its own contribution in noise (the gradient's signal-to-noise ratio falls with
        the group's width). With `baseline` on, each agent subtracts what R would be from the
        others alone, (dropped by the others) x (running mean of the accuracy term): it does
        not depend on the agent's own action, so the expected gradient is DECORE's, but far
        fewer joint training steps are needed.
        """
        dropped = 1.0 - keep
        reward = float(dropped.sum()) * accuracy_term
        if not self.baseline:
            return torch.full_like(keep, reward)
        mean = accuracy_term if self._accuracy_mean is None else self._accuracy_mean
        return reward - (float(dropped.sum()) - dropped) * mean

    def _adapt_lambda(self, result: CandidateResult) -> None:
        """Steer the accuracy penalty with what the target measured (failures carry no signal)."""
        if not result.ok or result.latency_ms is None:
            return
        low, high = LAMBDA_RANGE
        budget = self.space.budget_ms
        if budget is not None and result.latency_ms > budget:
            self.lam = max(self.lam / self.lam_factor, low)
        elif result.accuracy < self.space.original_accuracy - self._tolerance():
            self.lam = min(self.lam * self.lam_factor, high)

    def _tolerance(self) -> float:
        """The accuracy loss that raises the penalty: the objective's floor when it has one."""
        drop = self.space.max_accuracy_drop
        return self.accuracy_tolerance if drop is None else drop

    # ------------------------------------------------------------------------------- policies

    def keep_probabilities(self) -> dict[str, np.ndarray]:
        """Current keep probability of every channel, per coupling group."""
        return {g: torch.sigmoid(w.detach()).numpy() for g, w in self.logits.items()}

    def current_policy(self) -> Policy:
        """The Policy the agents stand for now: channels with p < 0.5 are dropped.

        A group's keep ratio is its fraction of channels with p >= 0.5 (never below the space's
        minimum, never zero); `channel_scores` are the probabilities, so pruning removes the
        channels the agents drop rather than the smallest weights.
        """
        probs = self.keep_probabilities()
        keep = {
            g: max(float((p >= 0.5).mean()), self.space.min_keep, 1.0 / max(p.size, 1))
            for g, p in probs.items()
        }
        precision = search_precision(self.space)  # DECORE searches channels, not precisions
        layers = {
            layer.name: LayerAction(
                keep.get(layer.group, 1.0) if layer.prunable else 1.0, precision
            )
            for layer in self.space.layers
        }
        scores = {g: tuple(round(float(x), 6) for x in p) for g, p in probs.items()}
        return Policy(layers, channel_scores=scores)

    # ---------------------------------------------------------------------------- persistence

    def save(self, folder: Path) -> None:
        """Write `decore.pt` (logits, Adam state, RNG) and `decore.json` (lambda, counters)."""
        folder = Path(folder)
        tensors: dict[str, Any] = {
            "logits": {g: w.detach().clone() for g, w in self.logits.items()},
            "optimizer": self._optimizer.state_dict() if self._optimizer else {},
            "rng": self.generator.get_state(),
        }
        atomic_write_with(folder / "decore.pt", lambda tmp: torch.save(tensors, tmp))
        write_json(
            folder / "decore.json",
            {
                "version": STATE_VERSION,
                "lam": self.lam,
                "episodes_done": self.episodes_done,
                "total_episodes": self.total_episodes,
                "steps_done": self.steps_done,
                "accuracy_mean": self._accuracy_mean,
            },
        )

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote; the tensors load with `weights_only=True` (no pickle)."""
        folder = Path(folder)
        meta = json.loads((folder / "decore.json").read_text())
        if meta.get("version") != STATE_VERSION:
            raise ModelError(f"{folder / 'decore.json'}: unsupported state version")
        tensors = torch.load(folder / "decore.pt", weights_only=True)
        self.lam = float(meta["lam"])
        self.episodes_done = int(meta["episodes_done"])
        self.total_episodes = int(meta["total_episodes"])
        self.steps_done = int(meta["steps_done"])
        self._accuracy_mean = meta["accuracy_mean"]
        self.generator.set_state(tensors["rng"])
        self.logits = {g: w.clone().requires_grad_(True) for g, w in tensors["logits"].items()}
        self._optimizer = torch.optim.Adam(list(self.logits.values()), lr=self.lr)
        if tensors["optimizer"]:
            self._optimizer.load_state_dict(tensors["optimizer"])
        self._gate = None  # a fresh session, checked against the loaded groups when opened
