"""Shared helpers for strict, typed configuration files (profiles and run configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.core.errors import ConfigError
from pipeline.core.files import CONFIG_MAX_BYTES, load_yaml_mapping

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated."""

    # NaN and infinity are never meaningful settings (YAML spells them .nan and .inf)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """Read a YAML mapping with `yaml.safe_load`, turning every failure into a ConfigError
    (`pipeline.core.files`: missing, binary, huge, nested too deep, malformed)."""
    return load_yaml_mapping(path, what, ConfigError, CONFIG_MAX_BYTES)


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _model_of(annotation: Any) -> Any:
    """The model inside an annotation: Sub, Sub | None, list[Sub], Literal[...] | Sub."""
    if _is_model(annotation):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if _is_model(arg):
            return arg
    return annotation


def _walk(
    model: type[BaseModel], loc: tuple[Any, ...], key_at_end: bool = False
) -> tuple[list[str], Any]:
    """An error location as a user writes it (pydantic's union-member tags such as
    `RemoteDevice` or `literal['local']` left out), and the model reached at its end.
    `key_at_end`: the last part is a key the model lacks (an unknown key), not a tag."""
    current: Any = model
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):  # an index into a list: the item model is in `current`
            parts.append(str(part))
            continue
        fields = current.model_fields if _is_model(current) else None
        if fields is not None and part in fields:
            parts.append(part)
            current = _model_of(fields[part].annotation)
        elif fields is not None and not (key_at_end and i == len(loc) - 1):
            continue  # a union member's tag, not a key in the file
        else:
            parts.append(str(part))
            current = None
    return parts, current


def _first_error(exc: ValidationError) -> dict[str, Any]:
    """The first problem; within a union, the branch that got deepest into the value (the
    one the user meant: a mapping given for `device` is checked as an agent, not 'local')."""
    errors = exc.errors()
    head = errors[0]["loc"][:1]
    related = [e for e in errors if e["loc"][:1] == head]
    return max(related, key=lambda e: len(e["loc"]))


def format_validation_error(model: type[BaseModel], exc: ValidationError, source: str) -> str:
    """One line for the first validation problem: where, what, and the allowed keys."""
    err = _first_error(exc)
    loc = tuple(err["loc"])
    unknown = err["type"] == "extra_forbidden"
    where = ".".join(_walk(model, loc, key_at_end=unknown)[0]) or "(top level)"
    if unknown:
        reached = _walk(model, loc[:-1])[1]
        allowed = ", ".join(sorted(reached.model_fields) if _is_model(reached) else [])
        return f"{source}: unknown key '{where}'; allowed keys here: {allowed}"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    # Upper bounds lie far beyond any real use: hitting one means a typo, not a big device
    why = "; no real use needs more" if err["type"] in ("less_than", "less_than_equal") else ""
    return f"{source}: {where}: {err['msg']}{why}{more}"


def parse_model(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate `data` into `model`, raising a one-line ConfigError on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(model, exc, source)) from None
