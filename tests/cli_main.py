"""`pipeline ARGS` run in this process through `pipeline.cli.main`, its output captured.

Cheaper than a subprocess, so property-based tests can afford many calls; the CLI is the real
one (argument parsing, error printing, exit codes).
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass

from pipeline import cli


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def one_line_error(self) -> bool:
        """Bad input as the CLI promises it: one line on stderr, no traceback."""
        lines = self.err.strip().splitlines()
        return len(lines) == 1 and "Traceback" not in self.err


def main_in_process(*args: str) -> Result:
    """Run `pipeline ARGS`; the exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["pipeline", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return Result(code, out.getvalue(), err.getvalue())
