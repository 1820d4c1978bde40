"""Run directory, atomic writes, file hashes, and the installed versions behind a result.

Every file is written under a temporary name in the same folder and renamed into place, so a run
that fails or is killed never leaves a truncated file under an artifact's real name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError


def _file_mode() -> int:
    """The mode a plainly created file gets here (mkstemp would make it private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value"):  # enums
        return obj.value
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Let `writer` produce the file at a temporary path, then rename it to `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)


def atomic_copy(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a temporary name: `target` is whole or absent."""
    atomic_write_with(Path(target), lambda tmp: shutil.copyfile(source, tmp))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def check_out_dir(root: Path) -> None:
    """Refuse an output folder no run directory can be created in, before any work.

    Raises:
        ConfigError: `root`, or a folder above it, is a file; or the nearest existing folder is
            not writable (permissions, a read-only file system).
    """
    root = Path(root)
    existing = root
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        is_dir = existing.is_dir()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--out {root}: {_reason(exc)}") from None
    if not is_dir:
        raise ConfigError(f"--out {root}: {existing} is a file, not a folder; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {root}: {existing} is not writable (permissions or a read-only file "
            "system); give a folder you can write to"
        )


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def new_run_dir(root: Path, profile_name: str) -> Path:
    """Create `root/<profile>-<UTC timestamp>/`, adding a suffix if that name is taken.

    The profile's name is reduced to file-name characters: it must not lead out of `root`.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", profile_name).lstrip(".") or "run"
    base = root / f"{safe}-{utc_stamp()}"
    candidate, n = base, 1
    try:
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
        candidate.mkdir(parents=True)
    except (OSError, ValueError) as exc:  # a file in the way, a read-only disk, a full one
        raise ConfigError(f"cannot create the run directory {candidate}: {_reason(exc)}") from None
    return candidate


def default_cache_dir() -> Path:
    """`$PIPELINE_CACHE`, or `~/.cache/pipeline`: trained demo baselines, rendered data sets."""
    env = os.environ.get("PIPELINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pipeline"


VERSIONED = (
    "torch",
    "torchvision",
    "torch-pruning",
    "onnx",
    "onnxruntime",
    "tensorrt",
    "stable-baselines3",
    "numpy",
    "pipeline",
)


def versions() -> dict[str, str | None]:
    """Installed versions of everything that shapes a result (None when not installed)."""
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found
