"""What the agent and its client agree on: headers, job ids, and how profiles and arrays travel.

Uploads are raw bytes (an ONNX graph, or an .npy array) with the target profile in a header, so
the server never parses a multipart form and never takes a file name from the client.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import ConfigError

if TYPE_CHECKING:  # the agent's server process never imports torch (profiles do, via policy)
    from pipeline.core.profile import TargetProfile

PROFILE_HEADER = "X-Pipeline-Profile"
SHA256_HEADER = "X-Pipeline-Sha256"
# What the server names an uploaded graph and the engine it builds from it, in the job folder.
# Only ONNX graphs are taken: engines are built on the device, never loaded from a client.
MODEL_NAME = "model.onnx"
ENGINE_NAME = "model.engine"
JOB_ID_BYTES = 16
_JOB_ID = re.compile(rf"[0-9a-f]{{{2 * JOB_ID_BYTES}}}")


def is_job_id(text: str) -> bool:
    """True for a server-made job id: exactly 32 lowercase hex digits, nothing else."""
    return bool(_JOB_ID.fullmatch(text))


def encode_profile(profile: TargetProfile) -> str:
    """The profile as compact JSON in base64url, fit for one HTTP header. A device needs no
    list of the other devices (and an agent of an earlier version would refuse the key)."""
    data = profile.model_dump(mode="json", exclude={"devices"})
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(text.encode()).decode("ascii")


def decode_profile(text: str) -> dict[str, Any]:
    """The profile data of `encode_profile`, with its device set to `local` (it runs here now).

    Only decoded here: the job process validates it (`TargetProfile`), so the agent's server
    process stays light.

    Raises:
        ConfigError: The header is not base64url JSON of an object.
    """
    try:
        data: Any = json.loads(base64.urlsafe_b64decode(text.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise ConfigError(f"{PROFILE_HEADER} is not base64url JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{PROFILE_HEADER} must hold a JSON object (a target profile)")
    data["device"] = "local"
    data.pop("devices", None)  # the device measures here, not across a fleet
    return data


def load_profile_data(data: dict[str, Any]) -> TargetProfile:
    """Validate uploaded profile data (in the job process).

    Raises:
        ConfigError: One line naming the first problem.
    """
    from pipeline.core.profile import TargetProfile
    from pipeline.core.schema import parse_model

    return parse_model(TargetProfile, data, "the uploaded profile")


def array_to_npy(array: np.ndarray) -> bytes:
    """The .npy bytes of `array` (never pickled)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_to_array(data: bytes) -> np.ndarray:
    """An array from .npy bytes; object arrays (which need pickle) are refused.

    Raises:
        ValueError: The bytes are not a plain .npy array.
    """
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"not a plain .npy array: {exc}") from None
