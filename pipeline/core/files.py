"""Reading the files a user hands the tool, each failure a typed one-line error.

Profiles, run configs, policies, manifests, weights, ONNX graphs and engines all pass through
here first: a missing file, a folder, a pipe, a symbolic-link loop, a permission problem, a file
far larger than any real one of its kind, bytes that are not UTF-8 text, malformed YAML or JSON,
and structures nested deeper than any real one become the caller's `PipelineError` subclass
(exit code 2), never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError, PipelineError

MiB = 1 << 20
GiB = 1 << 30
# Size caps per kind of file: far above any real one, low enough that reading one cannot
# exhaust memory. Weights, graphs and engines are read by their libraries, so only checked.
CONFIG_MAX_BYTES = 1 * MiB  # profiles and run configs: a few hundred bytes in practice
POLICY_MAX_BYTES = 64 * MiB  # per-channel scores of a large model fit many times over
MANIFEST_MAX_BYTES = 512 * MiB  # split indices of an image folder of millions of files
WEIGHTS_MAX_BYTES = 64 * GiB
ONNX_MAX_BYTES = 2 * GiB  # protobuf's own limit for one ONNX file
ENGINE_MAX_BYTES = 16 * GiB
# A configuration or policy nests a handful of levels; this is far beyond any real one, and
# low enough that nothing reading the parsed data runs out of stack.
MAX_DEPTH = 32
# Values after YAML aliases are expanded: aliases let a small file stand for an exponentially
# large structure that validation would walk in full.
MAX_VALUES = 1_000_000


def _size_text(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.3g} GiB"
    if n >= MiB:
        return f"{n / MiB:.3g} MiB"
    return f"{n} bytes"


def _os_problem(exc: OSError) -> str:
    """Why the file system refused, in words a user can act on."""
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop (a link that points back to itself)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (check the file's permissions)"
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is too long"
    return exc.strerror or type(exc).__name__


def check_file(path: Path | str, what: str, error: type[PipelineError], max_bytes: int) -> Path:
    """The path of a regular, readable file of at most `max_bytes`.

    Args:
        path: The file as the user gave it.
        what: What the file is, for messages ("run config", "weights").
        error: The typed error to raise.
        max_bytes: The largest file of this kind accepted.

    Raises:
        error: The file is missing, a folder, not a regular file (a pipe, a device), behind a
            symbolic-link loop, unreadable, or larger than `max_bytes`.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{what} file not found: {path} (check the path)") from None
    except OSError as exc:
        raise error(f"{what} {path}: {_os_problem(exc)}") from None
    except ValueError:  # a NUL byte in the path
        raise error(f"{what} path {path!r} holds a character no file name can") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{what} {path} is a folder; give the file itself")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is not a regular file (a pipe, socket or device)")
    if info.st_size > max_bytes:
        raise error(
            f"{what} {path} is {_size_text(info.st_size)}, over the {_size_text(max_bytes)} "
            f"a {what} file may have; check that it is the right file"
        )
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path}: permission denied (check the file's permissions)")
    return path


def read_bytes(path: Path | str, what: str, error: type[PipelineError], max_bytes: int) -> bytes:
    """The contents of a file checked by `check_file`."""
    path = check_file(path, what, error, max_bytes)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # the size may change between the stat and the read
    except OSError as exc:
        raise error(f"{what} {path}: {_os_problem(exc)}") from None
    if len(data) > max_bytes:
        raise error(f"{what} {path} is over the {_size_text(max_bytes)} a {what} file may have")
    return data


def read_text(path: Path | str, what: str, error: type[PipelineError], max_bytes: int) -> str:
    """A file's contents as UTF-8 text; binary files are refused."""
    data = read_bytes(path, what, error, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} {path} is not UTF-8 text (byte {exc.start} cannot be decoded): is it a "
            "binary file?"
        ) from None
    if "\x00" in text:
        raise error(f"{what} {path} holds NUL bytes: is it a binary file?")
    return text


def _children(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        yield from value.keys()
        yield from value.values()
    elif isinstance(value, (list, tuple)):
        yield from value


def check_shape(data: Any, source: str, error: type[PipelineError]) -> None:
    """Refuse data nested deeper than `MAX_DEPTH` or holding more than `MAX_VALUES` values.

    Heights and sizes are memoised per object, so a structure that YAML aliases share many
    times is walked once (linear in the file, not in its expansion).
    """
    memo: dict[int, tuple[int, int]] = {}  # id -> (height, values)
    keep: list[Any] = []  # holds every memoised object, so no id is reused during the walk

    def walk(value: Any, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise error(f"{source}: nested more than {MAX_DEPTH} levels deep; flatten it")
        if not isinstance(value, (dict, list, tuple)):
            return 0, 1
        known = memo.get(id(value))
        if known is None:
            parts = [walk(child, depth + 1) for child in _children(value)]
            known = (1 + max((h for h, _ in parts), default=0), 1 + sum(n for _, n in parts))
            memo[id(value)] = known
            keep.append(value)
        if depth + known[0] > MAX_DEPTH:
            raise error(f"{source}: nested more than {MAX_DEPTH} levels deep; flatten it")
        if known[1] > MAX_VALUES:
            raise error(f"{source}: holds more than {MAX_VALUES:,} values (YAML aliases?)")
        return known

    walk(data, 0)


def load_yaml_mapping(
    path: Path | str,
    what: str,
    error: type[PipelineError] = ConfigError,
    max_bytes: int = CONFIG_MAX_BYTES,
) -> dict[str, Any]:
    """A YAML file holding a mapping, read with `yaml.safe_load`."""
    text = read_text(path, what, error, max_bytes)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise error(f"{path}: malformed YAML{where}: {problem}; fix the syntax") from None
    except RecursionError:
        raise error(f"{path}: nested more than {MAX_DEPTH} levels deep; flatten it") from None
    except ValueError as exc:  # an integer of thousands of digits, a date out of range
        raise error(f"{path}: a value cannot be read ({exc}); fix it") from None
    check_shape(data, str(path), error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of keys at the top level")
    return data


def load_json(path: Path | str, what: str, error: type[PipelineError], max_bytes: int) -> Any:
    """A JSON document; NaN and Infinity, which JSON does not have, are refused."""
    text = read_text(path, what, error, max_bytes)
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        raise error(f"{path}: nested more than {MAX_DEPTH} levels deep; flatten it") from None
    except ValueError as exc:  # NaN / Infinity, or an integer of thousands of digits
        raise error(f"{path}: invalid JSON value ({exc})") from None
    check_shape(data, str(path), error)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
