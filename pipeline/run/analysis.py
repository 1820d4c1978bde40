"""The records of `pipeline analyze` (`pipeline.run.analyze`) and what it writes from them:
two CSV files (one row per prunable group, one per layer), `analysis.json` (the same rows and
the original's figures), `analysis.png`, and the tables it prints in the terminal."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.core.artifacts import atomic_write_text, atomic_write_with, write_json
from pipeline.core.profile import TargetProfile
from pipeline.core.stats import PairedDifference


@dataclass(frozen=True)
class Trial:
    """One candidate of the analysis: its validation accuracy, the paired change against the
    original, its measured latency (the profile's statistic), or why it failed."""

    accuracy: float | None
    change: PairedDifference | None
    latency_ms: float | None
    error: str | None = None


@dataclass
class GroupRow:
    """A prunable group: its layers, channels, latency share, and a trial per keep ratio."""

    group: str
    layers: tuple[str, ...]
    channels: int
    params: int
    macs: int
    latency_share: float | None
    kept: dict[float, int] = field(default_factory=dict)  # keep ratio -> channels kept
    pruned: dict[float, Trial] = field(default_factory=dict)


@dataclass
class LayerRow:
    """A Conv2d/Linear layer: its group (None when it is not pruned), share and INT8 trial."""

    layer: str
    group: str | None
    kind: str
    latency_share: float | None
    int8: Trial | None = None


@dataclass
class Analysis:
    """Everything `pipeline analyze` found."""

    profile: TargetProfile
    keep_ratios: tuple[float, ...]
    original_accuracy: float
    original_latency_ms: float
    val_images: int
    groups: list[GroupRow]
    layers: list[LayerRow]
    int8_allowed: bool
    # the original with every layer in one precision, measured on the target: {"int8": ms, ...}
    precision_latency_ms: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


GROUPS_CSV = "analysis_groups.csv"
LAYERS_CSV = "analysis_layers.csv"
ANALYSIS_JSON = "analysis.json"
ANALYSIS_PNG = "analysis.png"
GROUP_COLUMNS = ("group", "layers", "channels", "params", "macs", "latency_share")
LAYER_COLUMNS = ("layer", "group", "kind", "latency_share")
TRIAL_COLUMNS = (
    "accuracy",
    "accuracy_change",
    "change_low",
    "change_high",
    "within_noise",
    "latency_ms",
    "error",
)


def keep_prefix(ratio: float) -> str:
    """The column prefix of one keep ratio: `keep0.5_`."""
    return f"keep{ratio:g}_"


def group_columns(keep_ratios: tuple[float, ...]) -> list[str]:
    """The columns of the groups CSV, in order."""
    per_ratio = ("channels", *TRIAL_COLUMNS)
    return [*GROUP_COLUMNS, *(keep_prefix(r) + c for r in keep_ratios for c in per_ratio)]


def layer_columns() -> list[str]:
    """The columns of the layers CSV, in order."""
    return [*LAYER_COLUMNS, *(f"int8_{c}" for c in TRIAL_COLUMNS)]


def _trial_cells(trial: Trial | None, prefix: str) -> dict[str, Any]:
    change = trial.change if trial else None
    cells = {
        "accuracy": trial.accuracy if trial else None,
        "accuracy_change": change.difference if change else None,
        "change_low": change.low if change else None,
        "change_high": change.high if change else None,
        "within_noise": change.within_noise if change else None,
        "latency_ms": trial.latency_ms if trial else None,
        "error": trial.error if trial else None,
    }
    return {prefix + k: v for k, v in cells.items()}


def group_records(result: Analysis) -> list[dict[str, Any]]:
    """One record per prunable group, keyed by `group_columns`."""
    records = []
    for row in result.groups:
        record: dict[str, Any] = {
            "group": row.group,
            "layers": " ".join(row.layers),
            "channels": row.channels,
            "params": row.params,
            "macs": row.macs,
            "latency_share": row.latency_share,
        }
        for r in result.keep_ratios:
            record[keep_prefix(r) + "channels"] = row.kept[r]
            record.update(_trial_cells(row.pruned.get(r), keep_prefix(r)))
        records.append(record)
    return records


def layer_records(result: Analysis) -> list[dict[str, Any]]:
    """One record per Conv2d/Linear layer, keyed by `layer_columns`."""
    return [
        {
            "layer": row.layer,
            "group": row.group,
            "kind": row.kind,
            "latency_share": row.latency_share,
            **_trial_cells(row.int8, "int8_"),
        }
        for row in result.layers
    ]


def _csv_text(columns: list[str], records: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return buffer.getvalue()


def write_analysis(result: Analysis, out: Path) -> None:
    """The CSV files, analysis.json and analysis.png into `out` (each written atomically)."""
    groups, layers = group_records(result), layer_records(result)
    atomic_write_text(out / GROUPS_CSV, _csv_text(group_columns(result.keep_ratios), groups))
    atomic_write_text(out / LAYERS_CSV, _csv_text(layer_columns(), layers))
    profile = result.profile
    write_json(
        out / ANALYSIS_JSON,
        {
            "profile": profile.name,
            "runtime": profile.runtime,
            "statistic": profile.measure.statistic,
            "keep_ratios": list(result.keep_ratios),
            "original": {
                "accuracy": result.original_accuracy,
                "latency_ms": result.original_latency_ms,
                "precision_latency_ms": result.precision_latency_ms,
            },
            "val_images": result.val_images,
            "wall_s": result.wall_s,
            "groups": groups,
            "layers": layers,
        },
    )
    write_chart(result, out / ANALYSIS_PNG)


def _points(trial: Trial | None) -> tuple[float, float, float]:
    """(change, below, above) in points for an error bar; NaN for a failed trial."""
    change = trial.change if trial else None
    if change is None:
        return float("nan"), 0.0, 0.0
    d = change.difference * 100
    return d, d - change.low * 100, change.high * 100 - d


def write_chart(result: Analysis, path: Path) -> None:
    """Three panels: each group's latency share, each group's accuracy change at each keep
    ratio, each layer's accuracy change in INT8 alone (95% paired intervals as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [row.group for row in result.groups]
    height = 3 + 0.25 * (2 * len(names) + len(result.layers))
    fig, (share, prune, int8) = plt.subplots(3, 1, figsize=(8, height))
    y = np.arange(len(names))
    shares = [100 * (row.latency_share or 0.0) for row in result.groups]
    share.barh(y, shares, color="tab:blue")
    share.set(yticks=y, yticklabels=names, xlabel="share of the model's latency (%)")
    share.set_title(f"{result.profile.name}: where the latency goes (ONNX Runtime profiler)")
    width = 0.8 / max(len(result.keep_ratios), 1)
    for i, r in enumerate(result.keep_ratios):
        d, lo, hi = zip(*(_points(row.pruned.get(r)) for row in result.groups), strict=True)
        bars = {"xerr": [lo, hi], "ecolor": "0.4", "capsize": 2, "label": f"keep {r:g}"}
        prune.barh(y + i * width, d, width, **bars)
    prune.set(yticks=y + width * (len(result.keep_ratios) - 1) / 2, yticklabels=names)
    prune.set(xlabel="val accuracy change (points), group pruned alone, short fine-tune")
    prune.axvline(0, c="k", lw=0.5)
    prune.legend(fontsize=7)
    ly = np.arange(len(result.layers))
    d, lo, hi = zip(*(_points(row.int8) for row in result.layers), strict=True)
    int8.barh(ly, d, xerr=[lo, hi], color="tab:orange", ecolor="0.4", capsize=2)
    int8.set(yticks=ly, yticklabels=[row.layer for row in result.layers])
    int8.set(xlabel="val accuracy change (points), layer alone in INT8")
    int8.axvline(0, c="k", lw=0.5)
    for ax in (share, prune, int8):
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _change_cell(trial: Trial | None) -> str:
    """`-1.23 (12.3 ms)`; `~` marks a change within noise; `failed` a candidate that failed."""
    if trial is None:
        return ""
    if trial.error is not None or trial.change is None or trial.latency_ms is None:
        return "failed"
    noise = "~" if trial.change.within_noise else ""
    return f"{noise}{trial.change.difference * 100:+.2f} ({trial.latency_ms:.3f} ms)"


def _share_cell(share: float | None) -> str:
    return "" if share is None else f"{share:.1%}"


def print_analysis(console: Console, result: Analysis, out: Path) -> None:
    """The groups table, the layers table, and where the files are."""
    stat = result.profile.measure.statistic
    groups = Table(
        title=f"prunable groups: val accuracy change in points ({stat} latency), pruned alone "
        f"- original {result.original_accuracy:.2%}, {result.original_latency_ms:.3f} ms"
    )
    groups.add_column("group", no_wrap=True)
    for col in ("layers", "channels", "latency share"):
        groups.add_column(col, justify="right")
    for r in result.keep_ratios:
        groups.add_column(f"keep {r:g}", justify="right")
    for row in result.groups:
        cells = [f"{_change_cell(row.pruned.get(r))} [{row.kept[r]}]" for r in result.keep_ratios]
        share = _share_cell(row.latency_share)
        groups.add_row(row.group, str(len(row.layers)), str(row.channels), share, *cells)
    console.print(groups)
    if result.int8_allowed:
        layers = Table(title="layers: val accuracy change in points with the layer alone in INT8")
        for col in ("layer", "group", "latency share", "INT8 alone"):
            layers.add_column(col, justify="left" if col in ("layer", "group") else "right")
        for lr in result.layers:
            share = _share_cell(lr.latency_share)
            layers.add_row(lr.layer, lr.group or "(not pruned)", share, _change_cell(lr.int8))
        console.print(layers)
    every = ", ".join(f"{p} {ms:.3f} ms" for p, ms in result.precision_latency_ms.items())
    if every:
        console.print(f"the original with every layer in one precision: {every}")
    console.print(
        f"{result.val_images} validation images (one image is {100 / result.val_images:.2f} "
        "points); ~ marks a change whose 95% paired interval covers 0; \\[n] channels kept. "
        f"Written to {out}: {GROUPS_CSV}, {LAYERS_CSV}, {ANALYSIS_JSON}, {ANALYSIS_PNG} "
        f"({result.wall_s:.0f} s)"
    )
