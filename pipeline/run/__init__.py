"""A run: its stages (`stages`), shared state (`context`), baselines, report and validation."""

from pipeline.run.context import RunContext, console, stage
from pipeline.run.stages import execute

__all__ = ["RunContext", "console", "execute", "stage"]
