"""Child worker processes: measuring and device jobs run in one so a crash or a hang in a
runtime cannot take the caller down. Kept free of torch imports: the device agent's server
process uses it too."""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def answer_requests(
    conn: Connection, handle: Callable[[Any], Any], describe: Callable[[Exception], Any]
) -> None:
    """Child side: answer each request with ("ok", handle(request)), or ("error",
    describe(exc)) when it raises, until the parent sends None or goes away. A failed request
    is reported and the child lives on for the next."""
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            conn.send(("ok", handle(request)))
        except Exception as exc:
            conn.send(("error", describe(exc)))


def stop_child(proc: Any, conn: Connection | None, kill: bool = False) -> None:
    """Stop a worker process: ask it to exit (None on its pipe) and wait, or kill it at once
    (`kill`, or when it does not exit); its pipe is closed."""
    try:
        if not kill and conn is not None:
            conn.send(None)
            proc.join(timeout=5)
    except (BrokenPipeError, OSError):
        pass
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)
    if conn is not None:
        conn.close()


class ChildTimeout(Exception):
    """The child did not answer within its timeout."""


class ChildDied(Exception):
    """The child's pipe broke: it crashed or was killed."""

    def __init__(self, exit_code: int | None) -> None:
        super().__init__(f"exit code {exit_code}")
        self.exit_code = exit_code


def ask_child(proc: Any, conn: Connection, message: Any, timeout_s: float) -> Any:
    """Send `message` and return the child's answer.

    Raises:
        ChildTimeout: No answer within `timeout_s` (the caller kills the child).
        ChildDied: The child crashed before answering.
    """
    conn.send(message)
    if not conn.poll(timeout_s):
        raise ChildTimeout
    try:
        return conn.recv()
    except (EOFError, OSError):
        raise ChildDied(proc.exitcode if proc is not None else None) from None
