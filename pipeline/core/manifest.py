"""Reading a run directory's manifest.json back: for `--resume` and `pipeline validate`.

The manifest is written by the run itself (`pipeline.run.report.write_manifest`), but what is
read back may have been truncated, edited or replaced since; every part the readers use is
checked here, so a corrupt or incomplete manifest is a one-line ConfigError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.core.errors import ConfigError
from pipeline.core.files import MANIFEST_MAX_BYTES, load_json

MANIFEST = "manifest.json"


class RunManifest(BaseModel):
    """The parts of manifest.json a later command reads; the rest is for people."""

    model_config = ConfigDict(extra="allow", frozen=True)

    status: str
    stages_done: list[str] = []
    config: dict[str, Any]
    profile: dict[str, Any]


def load_manifest(run_dir: Path, purpose: str) -> RunManifest:
    """The manifest of `run_dir`, checked.

    Args:
        run_dir: A run directory.
        purpose: What it is read for, for messages ("cannot resume", "cannot validate").

    Raises:
        ConfigError: No manifest (not a run directory), or one that is unreadable, not JSON,
            or lacks the status, configuration or profile.
    """
    path = Path(run_dir) / MANIFEST
    if not os.path.lexists(path):  # a broken link or a loop is left to the loader to name
        raise ConfigError(f"{purpose} {run_dir}: it has no {MANIFEST} (not a run directory)")
    data = load_json(path, "run manifest", ConfigError, MANIFEST_MAX_BYTES)
    if not isinstance(data, dict):
        raise ConfigError(f"{purpose} {run_dir}: {path} is not a JSON object; the file is corrupt")
    try:
        return RunManifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"{purpose} {run_dir}: {path} is incomplete or corrupt ({where}: {err['msg']}); "
            "start a new run"
        ) from None
