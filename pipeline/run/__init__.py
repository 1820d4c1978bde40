"""A run: its stages in order (`execute`, `stages`), inputs and services (`context`), baselines,
report and validation."""

from pipeline.run.context import RunContext, console, stage
from pipeline.run.plan import execute

__all__ = ["RunContext", "console", "execute", "stage"]
