"""Latency per batch size: `pipeline bench --batch 1,8,32` and the report's `report_batches`.

Each batch is measured by its own measuring process (a profile is one batch size, and a
runner measures the profile's input), and the rounds go over every batch and every model in
turn (`bench_interleaved`): a slow spell of the machine hits all sides alike instead of the
batch or the model that happened to be measured during it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from pipeline.core.errors import ConfigError
from pipeline.core.profile import MAX_BATCH, TargetProfile
from pipeline.core.schema import parse_model
from pipeline.measure.bench import bench_interleaved, first_input_dims
from pipeline.measure.measure_worker import MeasureWorker

MAX_BATCHES = 16  # sizes in one session; each is a measuring process and a share of the rounds


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32): distinct sizes in the order given; else a one-line ConfigError."""
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if not sizes or any(not 1 <= b <= MAX_BATCH for b in sizes):
        raise ConfigError(
            f"--batch {text!r}: give batch sizes from 1 to {MAX_BATCH} separated by commas, "
            "e.g. 1,8,32"
        )
    distinct = tuple(dict.fromkeys(sizes))
    if len(distinct) > MAX_BATCHES:
        raise ConfigError(f"--batch {text!r}: at most {MAX_BATCHES} batch sizes in one session")
    return distinct


def with_batch(profile: TargetProfile, batch: int) -> TargetProfile:
    """The profile measuring inputs of `batch` images; validated like a loaded profile (a
    batch whose input would not fit in memory is a one-line ConfigError)."""
    if batch == profile.input.batch:
        return profile
    data = profile.model_dump(mode="json")
    data["input"]["batch"] = batch
    return parse_model(TargetProfile, data, f"{profile.name} at batch {batch}")


def static_batch(path: Path) -> int | None:
    """The batch size an ONNX graph's first input is fixed to; None when its batch axis is
    dynamic (our exports') or the file is no readable ONNX graph (the runner reports that)."""
    dims = first_input_dims(path)
    return dims[0] if dims and dims[0] > 0 else None


def check_batches(path: Path, batches: Sequence[int]) -> None:
    """Refuse, in one line, batch sizes a graph with a fixed batch cannot run.

    Raises:
        ConfigError: The graph's batch axis is static and some size differs from it.
    """
    fixed = static_batch(path)
    others = [b for b in batches if fixed is not None and b != fixed]
    if others:
        raise ConfigError(
            f"{path} has a static batch of {fixed}, so it cannot run batch "
            f"{', '.join(map(str, others))}: export it with a dynamic batch axis (the graphs "
            f"`pipeline run` writes have one), or measure --batch {fixed}"
        )


@contextlib.contextmanager
def batch_workers(
    profile: TargetProfile, batches: Sequence[int], timeout_s: float, typed_errors: bool = False
) -> Iterator[dict[int, MeasureWorker]]:
    """One measuring process per batch size (see `MeasureWorker`), closed on the way out."""
    profiles = {b: with_batch(profile, b) for b in batches}  # every size checked before work
    workers = {b: MeasureWorker(p, timeout_s, typed_errors) for b, p in profiles.items()}
    try:
        yield workers
    finally:
        for worker in workers.values():
            worker.close()


def bench_batches(
    workers: Mapping[int, MeasureWorker], artifacts: Mapping[str, Path], rounds: int
) -> list[dict[str, Any]]:
    """Measure every artifact at every batch, interleaved over `rounds` rounds.

    Returns:
        One entry per batch, in the order of `workers`: `batch`, and for each key of
        `artifacts` a `bench_interleaved` side with `throughput_ips` (images per second at
        its median latency); with two artifacts, `speedup` (the first's median over the
        second's).
    """
    jobs = {(b, key): (b, path) for b in workers for key, path in artifacts.items()}
    sides = bench_interleaved(lambda job: workers[job[0]].measure(job[1]), jobs, rounds)
    entries = []
    for b in workers:
        entry: dict[str, Any] = {"batch": b}
        for key in artifacts:
            side = sides[(b, key)]
            entry[key] = {**side, "throughput_ips": b * 1e3 / side["latency_ms"]["median"]}
        if len(artifacts) == 2:
            first, second = (entry[key]["latency_ms"]["median"] for key in artifacts)
            entry["speedup"] = first / second
        entries.append(entry)
    return entries


def format_batches(result: dict[str, Any]) -> Table:
    """A rich table of `pipeline bench --batch`: one row per batch (and model), with median,
    p90, throughput and cv; a run directory's rows also give the speedup."""
    models = result["models"]
    title = (
        f"latency per batch on {result['runtime']} ({result['threads']} threads, "
        f"{result['rounds']} interleaved rounds)"
    )
    table = Table(title=title)
    side_by_side = len(models) == 2
    columns = ("batch", "model", "median ms", "p90 ms", "images/s", "cv")
    for col in (*columns, "speedup") if side_by_side else columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    for entry in result["batches"]:
        for i, key in enumerate(models):
            side = entry[key]
            lat = side["latency_ms"]
            cells = [
                str(entry["batch"]) if i == 0 else "",
                key if side_by_side else Path(result["artifact"]).name,
                f"{lat['median']:.4f}",
                f"{lat['p90']:.4f}",
                f"{side['throughput_ips']:,.1f}",
                f"{lat['cv']:.3f}" + (" (noisy)" if side["noisy"] else ""),
            ]
            if side_by_side:
                cells.append(f"{entry['speedup']:.2f}x" if i == 1 else "")
            table.add_row(*cells)
    return table
