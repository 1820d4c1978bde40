"""Typed errors for bad input. The CLI prints each as one line and exits with code 2."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def printable(text: str) -> str:
    """`text` with control characters escaped (`\\n`, `\\x00`): a key or a path taken from a
    user's file cannot break a message over lines or into the terminal's control codes."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class PipelineError(Exception):
    """Bad input from the user: the message says what is wrong, where, and how to fix it.

    The message is always one line (`printable`), as the CLI prints it.
    """

    exit_code = 2

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (printable(args[0]), *args[1:])
        super().__init__(*args)


class ConfigError(PipelineError):
    """A profile or run configuration is malformed or has unknown keys."""


class ModelError(PipelineError):
    """A model cannot be built, loaded, or run on the given input."""


class DataError(PipelineError):
    """A data source is missing, empty or malformed."""


class PolicyError(PipelineError):
    """A policy names unknown layers or holds invalid actions."""


class RuntimeNotAvailable(PipelineError):
    """The profile's runtime or device cannot be used on this machine; `reason` is why, without
    the advice of the message."""

    def __init__(self, *args: object, reason: str | None = None) -> None:
        super().__init__(*args)
        self.reason = printable(reason) if reason is not None else str(self)


class MeasurementError(Exception):
    """A latency measurement is broken (e.g. faster than the physical floor).

    Not a user error: the orchestrator records it as a failed measurement.
    """
