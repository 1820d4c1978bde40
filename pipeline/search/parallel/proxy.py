"""Evaluators that stand in for a `CandidateEvaluator` and add candidates in flight.

A proxy owns its underscore attributes; everything else is the wrapped evaluator's, read and
written (the search restores counters and sets the budget through it), so the search and the
agents see one evaluator whatever the backend.
"""

from __future__ import annotations

from typing import Any


class EvaluatorProxy:
    """Delegates to `base` whatever it does not define itself."""

    def __init__(self, base: Any, workers: int) -> None:
        object.__setattr__(self, "base", base)
        self._workers = workers

    @property
    def workers(self) -> int:
        """Candidates in flight at once; agents propose this many at a time."""
        return self._workers

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the proxy itself.
        return getattr(self.base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name == "base":
            object.__setattr__(self, name, value)
        else:
            setattr(self.base, name, value)


class LocalBatches(EvaluatorProxy):
    """The local backend with several workers: agents propose candidates in batches (as they
    would for a Ray cluster) and this process evaluates them one after another."""

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "workers": self.workers}
