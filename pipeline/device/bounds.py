"""Upper bounds on the numbers a request brings to the agent, checked before any work.

The job process validates an uploaded profile in full (`TargetProfile`), but its types accept
any size: `threads: 100000` would start a hundred thousand runtime threads on the board. These
bounds are far beyond what a real device needs and are checked in the server, which stays
light (no torch), before a job folder is made.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.measure.device_protocol import PROFILE_HEADER

# (path in the profile, lowest, highest)
PROFILE_BOUNDS: tuple[tuple[tuple[str, ...], int, int], ...] = (
    (("threads",), 1, 256),
    (("measure", "warmup"), 1, 10_000),
    (("measure", "repeats"), 30, 1_000_000),
    (("measure", "rounds"), 1, 100),
    (("input", "batch"), 1, 4096),
)
MAX_SHAPE_DIM = 16_384
# batch x channels x height x width: 1 GiB of float32 input
MAX_INPUT_ELEMENTS = 2**28
MAX_PROFILE_HEADER_CHARS = 16 * 1024


def check_profile_header_size(text: str) -> None:
    if len(text) > MAX_PROFILE_HEADER_CHARS:
        raise ConfigError(
            f"{PROFILE_HEADER} holds {len(text)} characters, above the agent's limit of "
            f"{MAX_PROFILE_HEADER_CHARS}"
        )


def check_profile_bounds(profile: dict[str, Any]) -> None:
    """Refuse a profile whose numbers a device never needs.

    Values that are not numbers are left to the job's validation, which names them; numbers
    written as text are read as the validation would read them.

    Raises:
        ConfigError: One line naming the field, its value and the limit.
    """
    for path, low, high in PROFILE_BOUNDS:
        _check(".".join(path), _at(profile, path), low, high)
    shape = _at(profile, ("input", "shape"))
    if isinstance(shape, list | tuple):
        for index, dim in enumerate(shape):
            _check(f"input.shape[{index}]", dim, 1, MAX_SHAPE_DIM)
        _check_elements(profile, shape)


def _at(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _number(value: Any) -> float | None:
    """The value as the profile's validation would read a number, else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str | bytes):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check(field: str, value: Any, low: int, high: int) -> None:
    number = _number(value)
    if number is None:
        return
    if math.isnan(number) or not low <= number <= high:
        raise ConfigError(
            f"{PROFILE_HEADER}: {field} = {value!r} is outside the agent's limits [{low}, {high}]"
        )


def _check_elements(profile: dict[str, Any], shape: list[Any] | tuple[Any, ...]) -> None:
    numbers = [_number(dim) for dim in shape]
    batch = _number(_at(profile, ("input", "batch")))
    numbers.append(1.0 if batch is None else batch)
    if any(n is None for n in numbers):
        return
    elements = math.prod(n for n in numbers if n is not None)
    if elements > MAX_INPUT_ELEMENTS:
        raise ConfigError(
            f"{PROFILE_HEADER}: input batch x shape = {elements:.0f} elements, above the "
            f"agent's limit of {MAX_INPUT_ELEMENTS} (1 GiB of float32)"
        )
