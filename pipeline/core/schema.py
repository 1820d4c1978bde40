"""Shared helpers for strict, typed configuration files (profiles and run configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """Read a YAML mapping with `yaml.safe_load`, turning every failure into a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path} (check the path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk a pydantic model along an error location to list the keys allowed there."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an index into a list of models: the model is in `current`
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
        # Optional[Sub] and Sub | None: take the model member of the union.
        for arg in getattr(current, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def format_validation_error(model: type[BaseModel], exc: ValidationError, source: str) -> str:
    """One line for the first validation problem: where, what, and the allowed keys."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(model, loc))
        return f"{source}: unknown key '{where}'; allowed keys here: {allowed}"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {where}: {err['msg']}{more}"


def parse_model(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate `data` into `model`, raising a one-line ConfigError on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(model, exc, source)) from None
