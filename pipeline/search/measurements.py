"""Measured latencies, kept by what determines them, so no candidate is measured twice.

The key of a candidate is its pruned architecture, the precision of each layer, the profile
and the runtime versions (and the device agent's board when one measures): anything else about
a candidate cannot change its latency.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.core.artifacts import versions
from pipeline.core.policy import Policy, policy_layers
from pipeline.core.profile import TargetProfile


class MeasurementCache:
    """Latency results keyed by candidate signature; persisted as JSON lines (append-only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: ignore it
                    continue
                self.entries[record["key"]] = record["result"]

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, result: dict[str, Any]) -> None:
        self.entries[key] = result
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"key": key, "result": result}) + "\n")
                fh.flush()


def candidate_key(model: nn.Module, policy: Policy, profile: TargetProfile) -> str:
    """What determines latency: channel counts, precisions, profile, runtime versions (and
    the device agent's board and runtimes when the profile measures on one)."""
    arch = [
        [n, list(m.weight.shape)]
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    precisions = {n: policy.action(n).precision.value for n in policy_layers(model)}
    v = versions()
    payload = {
        "arch": arch,
        "precisions": precisions,
        "profile": profile.model_dump(mode="json"),
        "runtime": {k: v.get(k) for k in ("onnxruntime", "tensorrt", "onnx")},
    }
    if profile.device != "local":  # measured on an agent: its board and runtimes decide
        from pipeline.measure.device_client import device_identity

        payload["device"] = device_identity(profile)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
