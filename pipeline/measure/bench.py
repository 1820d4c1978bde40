"""Measure an artifact's latency on a target, honestly: the API behind `pipeline bench`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rich.table import Table

from pipeline.core.profile import TargetProfile
from pipeline.measure.runners.base import LatencyStats
from pipeline.measure.runners.floor import check_floor, physical_floor
from pipeline.measure.runners.registry import get_runner


def measure_artifact(
    profile: TargetProfile, artifact: Path, *, cost_model: Path | None = None
) -> dict[str, Any]:
    """Measure `artifact` with the profile's runner and check it against the physical floor.

    Args:
        profile: Picks the runner, threads, input shape, batch, warm-up and repeats.
        artifact: The .onnx (or .engine) file to measure.
        cost_model: The ONNX graph whose cost gives the floor; defaults to the artifact when it
            is .onnx, else to the .onnx beside it (`model.engine` -> `model.onnx`).

    Returns:
        `LatencyStats.to_dict()` plus `floor_ms` (None when no floor can be known); plain data
        that `LatencyStats.from_dict` reads back.

    Raises:
        RuntimeNotAvailable: The profile's runtime or device cannot be used here.
        ModelError: The artifact is missing or cannot be loaded or run.
        MeasurementError: The measurement beat the physical floor.
    """
    artifact = Path(artifact)
    with get_runner(profile, artifact) as runner:
        stats = runner.measure(profile.measure.warmup, profile.measure.repeats)
    onnx_path = cost_model or _cost_model_for(artifact)
    floor = physical_floor(profile, onnx_path) if onnx_path else None
    if floor is not None:
        check_floor(stats, floor)
    return {**stats.to_dict(), "floor_ms": floor["floor_ms"] if floor else None}


def bench_artifact(
    profile: TargetProfile, artifact: Path, *, cost_model: Path | None = None
) -> dict[str, Any]:
    """Benchmark one artifact for the CLI and reports.

    Args:
        profile: The target profile.
        artifact: The .onnx (or .engine) file.
        cost_model: See `measure_artifact`.

    Returns:
        `artifact`, `runtime`, `threads`, `batch`, `latency_ms` {median, p90, mean, min, cv},
        `repeats`, `warmup`, `floor_ms`, `floor_ratio` (median over floor; None without a
        floor) and `noisy` (cv above the profile's `measure.max_cv`).

    Raises:
        Same as `measure_artifact`.
    """
    measured = measure_artifact(profile, artifact, cost_model=cost_model)
    stats = LatencyStats.from_dict(measured)
    floor_ms = measured["floor_ms"]
    return {
        "artifact": str(artifact),
        "runtime": profile.runtime,
        "threads": profile.threads,
        "batch": stats.batch,
        "latency_ms": {
            "median": stats.median_ms,
            "p90": stats.p90_ms,
            "mean": stats.mean_ms,
            "min": stats.min_ms,
            "cv": stats.cv,
        },
        "repeats": stats.repeats,
        "warmup": stats.warmup,
        "floor_ms": floor_ms,
        "floor_ratio": stats.median_ms / floor_ms if floor_ms else None,
        "noisy": stats.cv > profile.measure.max_cv,
    }


Measure = Callable[[Path], dict[str, Any]]
"""A `bench_artifact`-like function of one artifact (in process, or in a `MeasureWorker`)."""

K = TypeVar("K")
A = TypeVar("A")


def bench_interleaved(
    measure: Callable[[A], dict[str, Any]], artifacts: Mapping[K, A], rounds: int
) -> dict[K, dict[str, Any]]:
    """Measure each artifact once per round, in turn, for `rounds` rounds.

    A slow spell of the machine then hits every side of a comparison alike instead of one,
    and a single disturbed round cannot decide a gate: each side's statistics are their
    medians over the rounds, and `rounds_ms` lists the per-round medians.

    Args:
        measure: A `Measure` of one artifact (a path; or whatever `artifacts` holds, such as
            a (batch, path) pair that `pipeline.measure.batches` measures).
        artifacts: The sides, by key, in the order each round measures them.
        rounds: Rounds of measurements.

    Returns:
        For each key of `artifacts`, a `bench_artifact`-shaped result.
    """
    per_side: dict[K, list[dict[str, Any]]] = {key: [] for key in artifacts}
    for _ in range(rounds):
        for key, path in artifacts.items():
            per_side[key].append(measure(path))
    return {key: over_rounds(results) for key, results in per_side.items()}


def over_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's `bench_artifact` results of several rounds as one: each statistic's median
    over the rounds, with the per-round medians in `rounds_ms`."""
    stats = results[0]["latency_ms"].keys()
    latency = {k: float(np.median([r["latency_ms"][k] for r in results])) for k in stats}
    floor_ms = results[0]["floor_ms"]
    return {
        **results[0],
        "latency_ms": latency,
        "floor_ratio": latency["median"] / floor_ms if floor_ms else None,
        "noisy": 2 * sum(bool(r["noisy"]) for r in results) > len(results),
        "rounds_ms": [r["latency_ms"]["median"] for r in results],
    }


def format_bench(result: dict[str, Any]) -> Table:
    """A rich table of a `bench_artifact` result (print it with `rich.console.Console`)."""
    lat = result["latency_ms"]
    table = Table(title=f"latency of {Path(result['artifact']).name}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("runtime", f"{result['runtime']} ({result['threads']} threads)")
    table.add_row("batch", str(result["batch"]))
    for key in ("median", "p90", "mean", "min"):
        table.add_row(f"{key} ms", f"{lat[key]:.4f}")
    noisy = " [yellow](noisy)[/yellow]" if result["noisy"] else ""
    table.add_row("cv", f"{lat['cv']:.3f}{noisy}")
    table.add_row("runs", f"{result['warmup']} warm-up + {result['repeats']} timed")
    if result["floor_ms"] is not None:
        table.add_row("physical floor ms", f"{result['floor_ms']:.4g}")
        table.add_row("median / floor", f"{result['floor_ratio']:.1f}x")
    else:
        table.add_row("physical floor ms", "unknown (no ONNX graph or peaks)")
    return table


RUN_DIR_MODELS = {"original": "original.onnx", "deployed": "model.onnx"}


def bench_run_dir(
    profile: TargetProfile, run_dir: Path, measure: Measure | None = None
) -> dict[str, Any]:
    """Benchmark a run directory's original.onnx and deployed model.onnx with the same runner,
    interleaved over the profile's `measure.rounds`, in this process or with `measure`.

    Returns:
        `original` and `deployed` (each a `bench_interleaved` result) and `speedup`, the
        original's median latency over the deployed model's.

    Raises:
        ConfigError: The folder lacks one of the two models.
        Same as `measure_artifact`.
    """
    paths = run_dir_models(Path(run_dir))
    result: dict[str, Any] = bench_interleaved(
        measure or (lambda path: bench_artifact(profile, path)), paths, profile.measure.rounds
    )
    medians = [result[key]["latency_ms"]["median"] for key in RUN_DIR_MODELS]
    result["speedup"] = medians[0] / medians[1]
    return result


def run_dir_models(run_dir: Path) -> dict[str, Path]:
    """A run directory's original and deployed graphs, by `RUN_DIR_MODELS` key.

    Raises:
        ConfigError: The folder lacks one of the two models.
    """
    from pipeline.core.errors import ConfigError

    missing = [name for name in RUN_DIR_MODELS.values() if not (run_dir / name).is_file()]
    if missing:
        raise ConfigError(
            f"{run_dir} has no {' or '.join(missing)}: give a finished run directory or a model"
        )
    return {key: run_dir / name for key, name in RUN_DIR_MODELS.items()}


def format_bench_run(result: dict[str, Any]) -> Table:
    """A rich table of a `bench_run_dir` result: both models side by side, and the speedup."""
    sides = [result[key] for key in RUN_DIR_MODELS]
    table = Table(title=f"latency on {sides[0]['runtime']} ({sides[0]['threads']} threads)")
    for col in ("", *RUN_DIR_MODELS):
        table.add_column(col, justify="right" if col else "left", style="" if col else "bold")
    for key in ("median", "p90", "mean", "min"):
        table.add_row(f"{key} ms", *(f"{s['latency_ms'][key]:.4f}" for s in sides))
    table.add_row(
        "cv",
        *(f"{s['latency_ms']['cv']:.3f}" + (" (noisy)" if s["noisy"] else "") for s in sides),
    )
    table.add_row("runs", *(f"{s['warmup']} + {s['repeats']}" for s in sides))
    table.add_row("speedup", "", f"{result['speedup']:.2f}x")
    return table


def first_input_dims(path: Path) -> list[int] | None:
    """The dimensions of an ONNX graph's first input (0 where symbolic); None for an engine, a
    missing or unreadable file, or a graph without inputs."""
    if path.suffix != ".onnx" or not path.is_file():
        return None
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # unreadable here: the runner reports it properly when it loads it
        return None
    if not graph.input:
        return None
    return [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]


def graph_input_shape(path: Path) -> tuple[int, int, int] | None:
    """The (C, H, W) of an ONNX graph's first input when its dimensions are static; None for an
    engine, a missing or unreadable file, or symbolic dimensions (the caller then decides)."""
    dims = first_input_dims(path)
    values = dims[1:] if dims else []
    if len(values) != 3 or any(v <= 0 for v in values):
        return None
    return (values[0], values[1], values[2])


def _cost_model_for(artifact: Path) -> Path | None:
    if artifact.suffix == ".onnx":
        return artifact
    sibling = artifact.with_suffix(".onnx")
    return sibling if sibling.is_file() else None
