"""The search loop around an agent: episode log, best candidate, checkpoints, resume, progress.

Every candidate an agent evaluates becomes one line of `episodes.jsonl`. Every few episodes the
agent, the episode count and the best candidate are checkpointed atomically into
`checkpoint/`; the measurement cache (`measurements.jsonl`) is append-only. A search killed at
any moment (even SIGKILL) resumes from the last checkpoint: the episode log is cut back to it
and repeated candidates come from the cache instead of being measured again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agents import make_agent
from agents.base import Agent
from pipeline.core.artifacts import write_json
from pipeline.core.choice import choose_best, closest, holds_floor
from pipeline.core.policy import Policy
from pipeline.core.space import CandidateResult
from pipeline.search.candidate import CandidateEvaluator

EPISODES = "episodes.jsonl"
CHECKPOINT = "checkpoint"


@dataclass
class SearchOutcome:
    """What the search found and what it cost."""

    agent: str
    episodes: int
    records: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # meets the budget with the highest accuracy
    closest: dict[str, Any] | None = None  # lowest latency, for when nothing meets the budget
    real_measurements: int = 0
    cached_measurements: int = 0
    predicted_measurements: int = 0
    latency_model: dict[str, Any] | None = None  # its error against real measurements
    wall_s: float = 0.0
    prune_precision: str | None = None  # the precision the agent's pruning ran every layer in

    def summary(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "episodes": self.episodes,
            "real_measurements": self.real_measurements,
            "cached_measurements": self.cached_measurements,
            "predicted_measurements": self.predicted_measurements,
            "latency_model": self.latency_model,
            "failed_candidates": sum(1 for r in self.records if r["error"]),
            "wall_s": round(self.wall_s, 1),
            "best_episode": self.best["episode"] if self.best else None,
        }


def episode_record(
    index: int,
    result: CandidateResult,
    reward: float,
    budget: float | None,
    floor: float | None = None,
) -> dict:
    """One line of episodes.jsonl (plain JSON, no NaN)."""
    meets = result.ok and (budget is None or result.latency_ms <= budget)
    return {
        "episode": index,
        "policy": result.policy.to_dict(),
        "accuracy": result.accuracy,
        "latency_ms": result.latency_ms,
        "latency_stats": result.extra.get("stats"),
        "macs": result.macs,
        "params": result.params,
        "source": result.source,
        "reward": reward,
        "meets_budget": bool(meets),
        "holds_floor": bool(result.ok and holds_floor(result.accuracy, floor)),
        "error": result.error,
        "time": time.time(),
    }


class SearchLog:
    """episodes.jsonl plus the best and closest candidates."""

    def __init__(self, path: Path, resolution: float = 0.0, floor: float | None = None) -> None:
        self.path = path
        self.resolution = resolution
        self.floor = floor
        self.records: list[dict[str, Any]] = []

    @property
    def best(self) -> dict[str, Any] | None:
        return choose_best(self.records, self.resolution, self.floor)

    @property
    def closest(self) -> dict[str, Any] | None:
        return closest(self.records, self.floor)

    def add(self, record: dict[str, Any], write: bool = True) -> None:
        self.records.append(record)
        if write:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def restore(self, keep: int) -> None:
        """Reload the first `keep` episodes (the checkpoint's) and cut the file back to them."""
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        kept = []
        for line in lines[:keep]:
            kept.append(json.loads(line))
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        for record in kept:
            self.add(record, write=False)


class Checkpointer:
    """Atomic checkpoints of the agent and search counters in `run_dir/checkpoint/`."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / CHECKPOINT

    def save(self, agent: Agent, evaluator: CandidateEvaluator) -> None:
        tmp = self.dir.with_name(CHECKPOINT + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        agent.save(tmp / "agent")
        state = {"episodes_done": agent.episodes_done, "evaluator": evaluator.state()}
        write_json(tmp / "state.json", state)
        old = self.dir.with_name(CHECKPOINT + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)  # the switch: a complete checkpoint or the previous one
        shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        for candidate in (self.dir, self.dir.with_name(CHECKPOINT + ".old")):
            if (candidate / "state.json").is_file():
                return candidate
        return None

    def load(self, agent: Agent, evaluator: CandidateEvaluator) -> int:
        """Restore agent and counters; returns the number of episodes the checkpoint holds."""
        folder = self.latest()
        if folder is None:
            return 0
        state = json.loads((folder / "state.json").read_text())
        agent.load(folder / "agent")
        agent.episodes_done = state["episodes_done"]
        evaluator.restore(state["evaluator"])
        return state["episodes_done"]


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]search"),
        BarColumn(),
        TextColumn("episode {task.completed}/{task.total}"),
        TextColumn("best reward {task.fields[reward]}"),
        TextColumn("best {task.fields[latency]} ms @ {task.fields[acc]}"),
        TimeElapsedColumn(),
        disable=not show,
    )


def run_search(
    evaluator: CandidateEvaluator,
    *,
    agent_name: str,
    reward_name: str,
    episodes: int,
    run_dir: Path,
    seed: int = 0,
    checkpoint_every: int = 2,
    resume: bool = False,
    show_progress: bool = True,
) -> SearchOutcome:
    """Let the agent search for `episodes` candidates; resumable from `run_dir`."""
    from agents.rewards import REWARDS

    agent = make_agent(agent_name, evaluator, REWARDS[reward_name], seed, run_dir)
    resolution = 1.0 / max(len(evaluator.val_labels), 1)
    floor = evaluator.space.accuracy_floor
    log, ckpt = SearchLog(run_dir / EPISODES, resolution, floor), Checkpointer(run_dir)
    log.restore(ckpt.load(agent, evaluator) if resume else 0)
    started = time.time()
    budget = evaluator.space.budget_ms
    best_reward = max((r["reward"] for r in log.records), default=float("nan"))
    with _progress(show_progress) as progress:
        task = progress.add_task(
            "search", total=episodes, completed=len(log.records), reward="-", latency="-", acc="-"
        )

        def on_episode(result: CandidateResult, reward: float) -> None:
            nonlocal best_reward
            log.add(episode_record(len(log.records), result, reward, budget, floor))
            if not reward <= best_reward:  # also true while best_reward is NaN
                best_reward = reward
            shown = log.best or log.closest  # recomputed per episode: cheap at these sizes
            progress.update(
                task,
                completed=len(log.records),
                reward=f"{best_reward:.3f}",
                latency=f"{shown['latency_ms']:.3f}" if shown else "-",
                acc=f"{shown['accuracy']:.2%}" if shown else "-",
            )
            if len(log.records) % checkpoint_every == 0:
                ckpt.save(agent, evaluator)

        agent.search(episodes, on_episode)
    ckpt.save(agent, evaluator)
    return SearchOutcome(
        agent=agent_name,
        episodes=len(log.records),
        records=log.records,
        best=log.best,
        closest=log.closest,
        real_measurements=evaluator.real_measurements,
        cached_measurements=evaluator.cached_measurements,
        predicted_measurements=evaluator.predicted_measurements,
        latency_model=evaluator.latency_model.summary() if evaluator.latency_model else None,
        wall_s=time.time() - started,
        prune_precision=agent.prune_precision().value,
    )


def policy_of(record: dict[str, Any]) -> Policy:
    return Policy.from_dict(record["policy"], f"episode {record['episode']}")
