"""N2N learning: remove whole residual blocks, then shrink what remains, with recurrent policies.

Stage 1 (layer removal): a bidirectional LSTM reads the model's removable residual blocks in
forward order and outputs, for each, the probability of replacing it by identity. Stage 2 (layer
shrinkage): a unidirectional LSTM reads the coupling groups that survive the best stage-1 removal
and, autoregressively (each step sees the previous action), picks a keep ratio among a few bins in
[min_keep, 1]. Both are trained with REINFORCE and an exponential moving-average baseline.

Under an accuracy floor or a budget, three additions for a search of a few dozen students:

- Stage 1 never evaluates a removal twice: a repeat is resampled, and once the removal policy
  only repeats itself, stage 1 ends and its remaining episodes go to shrinkage. (Measured with
  repeats, a search of 16 removal episodes drew the unpruned model 7 times and never tried the
  removal that won.)
- Stage 2 builds on a removal chosen for the objective (`agents.n2n_removal`): under a floor,
  the fastest that scored at least half the allowed drop above it (the fastest that just holds
  it leaves nothing for shrinkage); under a budget, the fastest whose score is within the
  final gate's allowed drop of the best (a faster removal below that drop first has its
  blocks restored one at a time). Under either, the fastest few are measured again side by
  side: one reading each does not order removals a few percent apart.
- Stage 2 opens with a bisection on one keep ratio for every surviving layer
  (`agents.bisection`): the smallest that holds the floor, or the largest that meets the
  budget; the shrinkage bins then scale that anchor per group (half to one and a half times
  it). Measured here, random bins in [min_keep, 1] almost never held a one-point floor, and
  under a budget at 0.6 x the unpruned INT8 model left every student far under the budget,
  tying uniform pruning where two late blocks removed with one keep ratio elsewhere beat it by
  half a point.

Students are trained by distillation from the original (the teacher): that is the evaluator's
short fine-tune when the run's distillation weight is > 0 (N2N's cross-entropy plus mean L2
between student and teacher logits, `pipeline.model.finetune.distillation_loss`), so nothing here
trains a model. The reward is whatever the run passes in; N2N's C(2-C) * A / A_teacher with the
gradually introduced constraint penalty is the default one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.base import Agent
from agents.bisection import Bisection
from agents.n2n_policies import (
    RemovalPolicy,
    ShrinkPolicy,
    block_features,
    group_features,
    inside,
    shrink_groups,
)
from agents.n2n_removal import Removals, budget_removal, floor_removal, restorations, roomy_removal
from agents.precisions import search_precision
from pipeline.core.artifacts import atomic_write_with, write_json
from pipeline.core.errors import ModelError
from pipeline.core.policy import LayerAction, Policy
from pipeline.core.space import (
    CandidateResult,
    EpisodeCallback,
    Evaluator,
    RewardFn,
)

STATE_VERSION = 1
RESAMPLES = 20  # draws for a removal not yet evaluated, before stage 1 counts as converged
ANCHOR_EPISODES = 5  # the floor bisection's steps: a bracket of 1/32 of [min_keep, 1]
RESTORATIONS = 2  # under a budget, removals with one block restored evaluated at most
ANCHOR_SCALES = (0.5, 1.5)  # the shrinkage bins' range around the anchor keep ratio


# --------------------------------------------------------------------------------------- agent


class N2NAgent(Agent):
    """N2N's two stages (block removal, then shrinkage) trained by REINFORCE with a baseline.

    Args:
        evaluator: Evaluates (prunes, distils briefly, measures) each student.
        reward: Scores each evaluated student; REINFORCE maximises it.
        seed: Seeds the policies' initial weights and action sampling.
        log_dir: Unused; accepted for the common agent signature.
        stage1_fraction: Share of the episodes spent on removal (skipped without removable blocks).
        removal_prior: Initial probability of removing each block.
        bins: Keep-ratio choices of stage 2, evenly spaced in [min_keep, 1].
        hidden: LSTM width of both policies.
        lr_remove: Adam learning rate of the removal policy (N2N: 0.003).
        lr_shrink: Adam learning rate of the shrinkage policy (N2N: 0.01).
        batch_size: Rollouts per policy update (N2N used 5; each rollout is a measured student).
        baseline_decay: Weight of the old value in the moving-average baseline.
    """

    name = "n2n"

    def __init__(
        self,
        evaluator: Evaluator,
        reward: RewardFn,
        seed: int = 0,
        log_dir: Path | None = None,
        *,
        stage1_fraction: float = 0.4,
        removal_prior: float = 0.2,
        bins: int = 8,
        hidden: int = 32,
        lr_remove: float = 0.003,
        lr_shrink: float = 0.01,
        batch_size: int = 1,
        baseline_decay: float = 0.8,
    ) -> None:
        super().__init__(evaluator, reward, seed, log_dir)
        if not 0.0 < removal_prior < 1.0 or bins < 2 or batch_size < 1:
            raise ValueError("need 0 < removal_prior < 1, bins >= 2 and batch_size >= 1")
        self.stage1_fraction = stage1_fraction
        self.batch_size = batch_size
        self.baseline_decay = baseline_decay
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            self.removal = RemovalPolicy(hidden, removal_prior)
            self.shrink = ShrinkPolicy(bins, hidden)
        self.opt_remove = torch.optim.Adam(self.removal.parameters(), lr=lr_remove)
        self.opt_shrink = torch.optim.Adam(self.shrink.parameters(), lr=lr_shrink)
        self.generator = torch.Generator().manual_seed(seed)
        low = self.space.min_keep if self.space.min_keep > 0 else 1.0 / bins
        self.ratios = [float(r) for r in np.linspace(low, 1.0, bins)]
        self.stage = 1
        self.baselines: dict[int, float | None] = {1: None, 2: None}
        self.pending: dict[int, list[tuple[list[int], float]]] = {1: [], 2: []}
        self.best: dict[int, tuple[float, Policy]] = {}  # stage -> (reward, policy)
        self.seen: set[tuple[str, ...]] = set()  # removals drawn in stage 1
        self.removals: Removals = {}  # stage 1's, as evaluated
        # under an objective, the removal chosen for stage 2 and its side-by-side session
        self.chosen: tuple[str, ...] | None = None
        self.removal_session: list[dict[str, Any]] = []
        # with an objective, stage 1 draws each removal once and stage 2 opens with a bisection
        objective = self.space.accuracy_floor is not None or self.space.budget_ms is not None
        self.unique_removals = objective
        precision = search_precision(self.space)
        self.anchor = Bisection(self.space, precision) if objective else None

    # ----------------------------------------------------------------------------- search loop

    def stage1_episodes(self, episodes: int) -> int:
        """Episodes given to removal: `stage1_fraction` of the total, at least one when there is
        something to remove and room for shrinkage after it, none without removable blocks."""
        if not self.space.removable_blocks or episodes < 2:
            return 0
        return min(max(1, round(self.stage1_fraction * episodes)), episodes - 1)

    def _search_impl(self, episodes: int, on_episode: EpisodeCallback) -> None:
        split = self.stage1_episodes(episodes)
        while self.episodes_done < episodes:
            if self.stage == 1 and self.episodes_done >= split:
                self._finish_stage1(episodes, on_episode)
            if self.stage == 2 and (keep := self._anchor_keep(episodes)) is not None:
                self._run_anchor(keep, on_episode)
                continue
            end = split if self.stage == 1 else episodes
            # Rollouts of one policy are evaluated together (N2N's batch of students): with
            # several workers, the policy is updated once per `workers` rollouts.
            size = min(self.workers, end - self.episodes_done)
            if self.stage == 1:
                rollouts = self._removal_rollouts(size)
                if not rollouts:  # the removal policy only repeats itself: shrink instead
                    self._finish_stage1(episodes, on_episode)
                    continue
            else:
                rollouts = [self._shrink_rollout() for _ in range(size)]
            self._run_batch(self.stage, rollouts, on_episode)

    def _finish_stage1(self, episodes: int, on_episode: EpisodeCallback) -> None:
        """Apply the removal policy's last partial batch, then freeze the removal for stage 2.
        Under a budget alone, first evaluate `restorations` while they leave room for the
        bisection and some shrinkage, then choose it (`budget_removal`); under a floor,
        `floor_removal` chooses it."""
        self._update(1, flush=True)
        budget_only = self.space.budget_ms is not None and self.space.accuracy_floor is None
        if budget_only and self.chosen is None:
            for removed in restorations(self.removals, self.space, self.seen)[:RESTORATIONS]:
                if episodes - self.episodes_done <= ANCHOR_EPISODES + 1:
                    break
                self.seen.add(removed)
                self._run_batch(1, [([], self._policy(removed, {}))], on_episode)
        if self.chosen is None and self.removals:
            choose = budget_removal if budget_only else floor_removal
            picked = choose(
                self.removals, self.space, lambda r: self._policy(r, {}), self.evaluator
            )
            if picked is not None:
                self.chosen, self.removal_session = picked
        self.stage = 2

    @property
    def best_removed(self) -> tuple[str, ...]:
        """The blocks stage 2 shrinks on (`agents.n2n_removal`): the removal chosen for the
        objective, the fastest with room above an accuracy floor by the search's readings
        (before stage 1 ends), else the best stage-1 student's (none before any)."""
        if self.chosen is not None:
            return self.chosen
        roomy = roomy_removal(self.removals, self.space)
        if roomy is not None:
            return roomy
        return self.best[1][1].removed if 1 in self.best else ()

    def _removal_rollouts(self, size: int) -> list[tuple[list[int], Policy]]:
        """Up to `size` removals; with an objective, only ones not evaluated before (fewer once
        the policy repeats itself)."""
        features = block_features(self.space)
        rollouts = []
        for _ in range(size):
            for _ in range(RESAMPLES):
                actions = self.removal.sample(features, self.generator)
                removed = tuple(
                    b for b, a in zip(self.space.removable_blocks, actions, strict=True) if a
                )
                if not self.unique_removals or removed not in self.seen:
                    self.seen.add(removed)
                    rollouts.append((actions, self._policy(removed, {})))
                    break
            else:
                break
        return rollouts

    def _anchor_keep(self, episodes: int) -> float | None:
        """The bisection's next keep ratio, or None once it ended (or without an objective).
        It takes at most ANCHOR_EPISODES and leaves at least half of stage 2 to shrinkage."""
        if self.anchor is None or not shrink_groups(self.space, self.best_removed):
            return None
        left = episodes - self.episodes_done + len(self.anchor.results)
        if len(self.anchor.results) >= min(ANCHOR_EPISODES, left // 2):
            return None
        return self.anchor.next_keep(ANCHOR_EPISODES)

    def _run_anchor(self, keep: float, on_episode: EpisodeCallback) -> None:
        """One bisection step: every surviving layer at `keep`, on the best removal."""
        removed = self.best_removed
        layers = {x.name: keep for g in shrink_groups(self.space, removed) for x in g}
        ((result, _),) = self._run_batch(2, [([], self._policy(removed, layers))], on_episode)
        if self.anchor is None:  # never: only a search with an objective has an anchor
            return
        if result.ok:
            self.anchor.record(keep, result.latency_ms, result.accuracy)
        else:
            self.anchor.record(keep, None, None)

    @property
    def shrink_ratios(self) -> list[float]:
        """The keep ratio of each shrinkage bin: evenly spaced in [min_keep, 1], or around the
        bisection's anchor once it found one."""
        best = self.anchor.best() if self.anchor is not None else None
        if best is None:
            return self.ratios
        low, high = ANCHOR_SCALES
        scales = np.linspace(low, high, len(self.ratios))
        return [float(np.clip(best[0] * x, self.space.min_keep, 1.0)) for x in scales]

    def _shrink_rollout(self) -> tuple[list[int], Policy]:
        removed = self.best_removed
        groups = shrink_groups(self.space, removed)
        if not groups:  # nothing left to shrink: evaluate the removal alone
            return [], self._policy(removed, {})
        actions = self.shrink.sample(group_features(self.space, groups), self.generator)
        ratios = self.shrink_ratios
        keep = {
            layer.name: ratios[a]
            for members, a in zip(groups, actions, strict=True)
            for layer in members
        }
        return actions, self._policy(removed, keep)

    def _policy(self, removed: tuple[str, ...], keep: dict[str, float]) -> Policy:
        """Every layer outside the removed blocks, in the search precision."""
        precision = search_precision(self.space)  # N2N searches architecture, not precision
        layers = {
            layer.name: LayerAction(keep.get(layer.name, 1.0), precision)
            for layer in self.space.layers
            if not inside(layer.name, removed)
        }
        return Policy(layers, removed=removed)

    def _run_batch(
        self,
        stage: int,
        rollouts: list[tuple[list[int], Policy]],
        on_episode: EpisodeCallback,
    ) -> list[tuple[CandidateResult, float]]:
        """Evaluate the rollouts, keep each stage's best and update that stage's policy;
        returns each rollout's result and reward."""
        scored = self.evaluate_many([policy for _, policy in rollouts], on_episode)
        for (actions, _), (result, reward) in zip(rollouts, scored, strict=True):
            if stage == 1 and result.ok and result.latency_ms is not None:
                removed = result.policy.removed
                self.removals[removed] = (float(result.latency_ms), float(result.accuracy))
            if stage not in self.best or reward > self.best[stage][0]:
                self.best[stage] = (reward, result.policy)
            if actions:
                self.pending[stage].append((actions, reward))
        self._update(stage)
        return scored

    # -------------------------------------------------------------------------------- learning

    def _update(self, stage: int, flush: bool = False) -> None:
        """REINFORCE over the pending rollouts: -(R - b) * log pi(actions), averaged; the
        baseline b is an exponential moving average of the rewards before this batch."""
        batch = self.pending[stage]
        if not batch or (len(batch) < self.batch_size and not flush):
            return
        baseline = self.baselines[stage]
        if baseline is None:  # first batch: its own mean, so no arbitrary early push
            baseline = float(np.mean([r for _, r in batch]))
        net, opt = (self.removal, self.opt_remove) if stage == 1 else (self.shrink, self.opt_shrink)
        features = self._features(stage)
        loss = torch.zeros(())
        for actions, reward in batch:
            loss = loss - (reward - baseline) * net.log_prob(features, actions)
        opt.zero_grad()
        (loss / len(batch)).backward()
        opt.step()
        for _, reward in batch:
            baseline = self.baseline_decay * baseline + (1.0 - self.baseline_decay) * reward
        self.baselines[stage] = baseline
        self.pending[stage] = []

    def _features(self, stage: int) -> torch.Tensor:
        if stage == 1:
            return block_features(self.space)
        return group_features(self.space, shrink_groups(self.space, self.best_removed))

    # ---------------------------------------------------------------------------- persistence

    def save(self, folder: Path) -> None:
        """Write `n2n.pt` (policies, optimisers, RNG) and `n2n.json` (stage, baselines, ...)."""
        folder = Path(folder)
        tensors: dict[str, Any] = {
            "removal": self.removal.state_dict(),
            "shrink": self.shrink.state_dict(),
            "opt_remove": self.opt_remove.state_dict(),
            "opt_shrink": self.opt_shrink.state_dict(),
            "rng": self.generator.get_state(),
        }
        atomic_write_with(folder / "n2n.pt", lambda tmp: torch.save(tensors, tmp))
        meta = {
            "version": STATE_VERSION,
            "episodes_done": self.episodes_done,
            "total_episodes": self.total_episodes,
            "stage": self.stage,
            "baselines": {str(s): b for s, b in self.baselines.items()},
            "pending": {str(s): [[a, r] for a, r in p] for s, p in self.pending.items()},
            "best": {
                str(s): {"reward": r, "policy": p.to_dict()} for s, (r, p) in self.best.items()
            },
            "blocks": list(self.space.removable_blocks),
            "seen": [list(r) for r in sorted(self.seen)],
            "removals": [[list(r), ms, score] for r, (ms, score) in self.removals.items()],
            "anchor": self.anchor.state() if self.anchor is not None else None,
            "chosen": list(self.chosen) if self.chosen is not None else None,
            "removal_session": self.removal_session,
        }
        write_json(folder / "n2n.json", meta)

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote; the tensors load with `weights_only=True` (no pickle)."""
        folder = Path(folder)
        meta = json.loads((folder / "n2n.json").read_text())
        if meta.get("version") != STATE_VERSION:
            raise ModelError(f"{folder / 'n2n.json'}: unsupported state version")
        if meta["blocks"] != list(self.space.removable_blocks):
            raise ModelError(f"{folder}: the saved N2N search was for another model; start anew")
        tensors = torch.load(folder / "n2n.pt", weights_only=True)
        self.removal.load_state_dict(tensors["removal"])
        self.shrink.load_state_dict(tensors["shrink"])
        self.opt_remove.load_state_dict(tensors["opt_remove"])
        self.opt_shrink.load_state_dict(tensors["opt_shrink"])
        self.generator.set_state(tensors["rng"])
        self.episodes_done = int(meta["episodes_done"])
        self.total_episodes = int(meta["total_episodes"])
        self.stage = int(meta["stage"])
        self.baselines = {int(s): b for s, b in meta["baselines"].items()}
        self.pending = {
            int(s): [(list(a), float(r)) for a, r in p] for s, p in meta["pending"].items()
        }
        self.best = {
            int(s): (float(v["reward"]), Policy.from_dict(v["policy"]))
            for s, v in meta["best"].items()
        }
        self.seen = {tuple(r) for r in meta.get("seen", [])}
        self.removals = {tuple(r): (ms, score) for r, ms, score in meta.get("removals", [])}
        chosen = meta.get("chosen")
        self.chosen = tuple(chosen) if chosen is not None else None
        self.removal_session = list(meta.get("removal_session", []))
        if self.anchor is not None and meta.get("anchor"):
            self.anchor.restore(meta["anchor"])
