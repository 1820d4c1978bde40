"""The policy search: the search space, candidate evaluation, the loop around an agent
(`loop`), confirmation of its pick, INT8 recovery, and the scale-out (`parallel`)."""

from pipeline.search.loop import (
    CHECKPOINT,
    EPISODES,
    Checkpointer,
    SearchLog,
    SearchOutcome,
    episode_record,
    policy_of,
    run_search,
)

__all__ = [
    "CHECKPOINT",
    "EPISODES",
    "Checkpointer",
    "SearchLog",
    "SearchOutcome",
    "episode_record",
    "policy_of",
    "run_search",
]
