"""How much the deployed model's full recovery adds to a candidate's score, measured once.

Under the accuracy-floor objective candidates are judged by their validation score after the
short fine-tune, but the model that ships gets the full recovery fine-tune, which adds accuracy
(on `digits-hard`, 1 to 2 validation points at half the channels). Judged against the shipped
floor itself, the search stops at models that hold it with that much to spare, and uniform
pruning bisected with full fine-tunes ends up faster. So before the search one uniform probe is
built both ways; what the full recovery added lowers the floor candidates must hold
(`SearchSpace.recovery_allowance`). The floor stage (`pipeline.run.floor_stage`) still builds
the pick in full and checks it against the shipped floor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.core.policy import uniform_policy

if TYPE_CHECKING:
    from pipeline.search.candidate import CandidateEvaluator
    from pipeline.search.materialize import Recovery

PROBE_KEEP = 0.5  # the probe's uniform keep ratio: the middle of where floors usually land
# The allowance is at most this many times the allowed drop, so that one probe that recovered
# unusually well cannot open the floor wide; the floor stage catches what gets through
MAX_ALLOWANCE_DROPS = 2.0


def measure_allowance(evaluator: CandidateEvaluator, full: Recovery) -> dict[str, Any]:
    """Score the probe after the candidates' fine-tune and after `full`, in the precision the
    channel search prunes in; the allowance is the gain, between 0 and its cap."""
    from agents.precisions import search_precision

    space = evaluator.space
    precision = search_precision(space)
    keep = max(PROBE_KEEP, space.min_keep)
    policy = uniform_policy(evaluator.model, keep, precision)
    short = evaluator.recovered_score(policy)
    recovered = evaluator.recovered_score(policy, full)
    cap = MAX_ALLOWANCE_DROPS * (space.max_accuracy_drop or 0.0)
    return {
        "probe_keep": keep,
        "precision": precision.value,
        "candidate_score": short,
        "full_recovery_score": recovered,
        "allowance": min(max(recovered - short, 0.0), cap),
    }
