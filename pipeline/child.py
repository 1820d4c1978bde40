"""Child worker processes: measuring and device jobs run in one so a crash or a hang in a
runtime cannot take the caller down. Kept free of torch imports: the device agent's server
process uses it too."""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any


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
