"""The search: environment, rewards, and agents (SB3's and the seed papers' own).

Agents are looked up by name; each lives in its own module and is imported only when asked
for, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from agents.base import Agent
from pipeline.core.space import CandidateResult, Evaluator, LayerInfo, RewardFn, SearchSpace

AGENTS: dict[str, str] = {
    "ppo": "agents.sb3_ppo:TwoStagePPO",
    "dqn": "agents.sb3_agents:DQNAgent",
    "sac": "agents.sb3_agents:SACAgent",
    "td3": "agents.sb3_agents:TD3Agent",
    "decore": "agents.decore:DecoreAgent",
    "n2n": "agents.n2n:N2NAgent",
    "uniform": "agents.baselines:UniformAgent",
    "random": "agents.baselines:RandomAgent",
}
DEFAULT_AGENT = "n2n"


def agent_class(name: str) -> type[Agent]:
    """The Agent class registered under `name`."""
    from pipeline.core.errors import ConfigError

    if name not in AGENTS:
        raise ConfigError(f"unknown agent '{name}'; choose one of: {', '.join(AGENTS)}")
    module, cls = AGENTS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_agent(
    name: str, evaluator: Evaluator, reward: RewardFn, seed: int = 0, log_dir: Path | None = None
) -> Agent:
    """Build the agent `name` around an evaluator and a reward."""
    return agent_class(name)(evaluator, reward, seed=seed, log_dir=log_dir)


__all__ = [
    "AGENTS",
    "DEFAULT_AGENT",
    "Agent",
    "CandidateResult",
    "Evaluator",
    "LayerInfo",
    "RewardFn",
    "SearchSpace",
    "agent_class",
    "make_agent",
]
