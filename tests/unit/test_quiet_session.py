"""The final comparison is measured again while a side reads noisy (`pipeline.run.stages`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.core.config import RunConfig
from pipeline.run import RunContext, stages


def _onnx(path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, 3, 32, 32))  # materialize the lazy layer
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but still exact
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False)
    return path


@pytest.mark.parametrize(("max_cv", "sessions"), [(1e9, 1), (1e-9, 1 + stages.NOISY_RETRIES)])
def test_a_noisy_final_comparison_is_measured_again_and_the_quietest_session_kept(
    tiny_profile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_cv: float, sessions: int
) -> None:
    # max_cv tiny: every real session reads noisy; huge: none does
    measure = tiny_profile.measure.model_copy(update={"max_cv": max_cv})
    ctx = RunContext(tiny_profile.model_copy(update={"measure": measure}), RunConfig(), tmp_path)
    graph = _onnx(tmp_path / "a.onnx")
    measured: list[dict[str, Any]] = []
    real = ctx.bench

    def counted(graphs: dict[str, Path], rounds: int | None = None) -> dict[str, Any]:
        measured.append(real(graphs, rounds))  # the real measuring session, counted
        return measured[-1]

    monkeypatch.setattr(ctx, "bench", counted)
    try:
        kept = stages._quiet_session(ctx, {"original": graph, "deployed": graph})
    finally:
        ctx.close()
    assert len(measured) == sessions

    def noisiest(session: dict[str, Any]) -> float:
        return max(side["latency_ms"]["cv"] for side in session.values())

    assert kept in measured and noisiest(kept) == min(noisiest(s) for s in measured)
