"""Latency against channel count, one ResNet-18 stage at a time, INT8 on the target.

The digits-hard baseline ResNet-18 (seed 0, 48x48) with every stage at half its channels (32,
64, 128, 256), then one stage at a time swept over channel counts in steps of 8 (the profile's
`channel_multiple`), the others left at half. No fine-tune: latency does not depend on the
weights. Every graph is exported to INT8 with the profile's scheme and measured in one
interleaved session (`--rounds`), so each point's ratio to the half-width model is paired.

It shows where a layer's measured latency steps, and how unequal the stages are in latency per
channel: what the floor descent's measured direction (`pipeline.run.descent`) relies on.

    python benchmarks/channel_steps.py --rounds 15

Writes `benchmarks/results/channel_steps.json`, `.md` and `.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import PROFILE, RESULTS

FULL = {1: 64, 2: 128, 3: 256, 4: 512}  # ResNet-18's channels per stage (stage 1 with the stem)
SWEEPS = {
    1: [24, 32, 40, 48, 56, 64],
    2: [48, 56, 64, 72, 80, 88, 96],
    3: [96, 104, 112, 120, 128, 136, 144, 152, 160],
    4: [192, 208, 224, 240, 256, 272, 288, 304, 320],
}


def _stage(layer: str) -> int | None:
    if layer == "conv1":
        return 1
    return int(layer[5]) if layer.startswith("layer") else None


def graphs(folder: Path, seed: int) -> dict[str, tuple[dict[int, int], Path]]:
    """{"stage S at C" -> (channels per stage, INT8 graph)}, the half-width model as "half"."""
    from exporters import export_onnx, quantize_onnx
    from pipeline.core.policy import LayerAction, Policy, Precision, policy_layers
    from pipeline.core.profile import load_profile
    from pipeline.model.data import load_data
    from pipeline.model.demo import DEMO_INPUT, demo_model
    from pipeline.search.materialize import calibration, materialize

    profile = load_profile(PROFILE)
    splits = load_data("digits-hard", DEMO_INPUT, seed=seed)
    model, _ = demo_model(splits, show_progress=False)
    calib = calibration(splits, profile.int8.calib_samples)
    half = {s: c // 2 for s, c in FULL.items()}
    points = {"half": half}
    for stage, counts in SWEEPS.items():
        points |= {f"stage {stage} at {c}": {**half, stage: c} for c in counts if c != half[stage]}
    out = {}
    for name, channels in points.items():
        layers = {}
        for layer in policy_layers(model):
            stage = _stage(layer)
            keep = 1.0 if stage is None else channels[stage] / FULL[stage]
            layers[layer] = LayerAction(keep, Precision.INT8)
        pruned = materialize(model, Policy(layers), profile).model
        stem = name.replace(" ", "_")
        fp32 = export_onnx(pruned, DEMO_INPUT, folder / f"{stem}_fp32.onnx")
        path = folder / f"{stem}.onnx"
        int8 = dict.fromkeys(policy_layers(pruned), Precision.INT8)
        quantize_onnx(fp32, path, int8, profile.int8, calib)
        out[name] = (channels, path)
    return out


def measure(paths: dict[str, Path], rounds: int) -> dict[str, Any]:
    from pipeline.core.profile import load_profile
    from pipeline.measure.bench import bench_interleaved
    from pipeline.measure.measure_worker import MeasureWorker

    with MeasureWorker(load_profile(PROFILE), timeout_s=1800) as worker:
        return bench_interleaved(worker.measure, paths, rounds)


def rows(points: dict[str, tuple[dict[int, int], Path]], measured: dict[str, Any]) -> list:
    from pipeline.core.stats import ratio_interval

    base = measured["half"]["rounds_ms"]
    out = []
    for name, (channels, _) in points.items():
        ratio = ratio_interval(measured[name]["rounds_ms"], base)
        out.append(
            {
                "name": name,
                "channels": channels,
                "median_ms": measured[name]["latency_ms"]["median"],
                "over_half": [ratio.value, *ratio.as_list()] if ratio else None,
            }
        )
    return out


def markdown(table: list[dict[str, Any]], rounds: int) -> str:
    lines = [
        f"| stage | channels | median ms | over the half-width model [95%], {rounds} rounds |",
        "|---|---|---|---|",
    ]
    half = next(r for r in table if r["name"] == "half")
    for stage in SWEEPS:
        sweep = [r for r in table if r["name"].startswith(f"stage {stage} ")] + [half]
        for r in sorted(sweep, key=lambda r: r["channels"][stage]):
            ratio = r["over_half"]
            lines.append(
                f"| {stage} | {r['channels'][stage]} | {r['median_ms']:.3f} | "
                f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}] |"
            )
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    half = next(r for r in table if r["name"] == "half")
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in SWEEPS:
        sweep = [r for r in table if r["name"].startswith(f"stage {stage} ")] + [half]
        sweep.sort(key=lambda r: r["channels"][stage])
        x = [r["channels"][stage] / FULL[stage] for r in sweep]
        ax.plot(x, [r["over_half"][0] for r in sweep], "o-", label=f"stage {stage}")
    ax.set(xlabel="the stage's channels / its full width", ylabel="latency / half-width model")
    ax.axhline(1.0, ls=":", c="grey", lw=0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        points = graphs(Path(tmp), args.seed)
        measured = measure({name: path for name, (_, path) in points.items()}, args.rounds)
    table = rows(points, measured)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "channel_steps.json").write_text(json.dumps(table, indent=2))
    (RESULTS / "channel_steps.md").write_text(markdown(table, args.rounds))
    plot(table, RESULTS / "channel_steps.png")
    print(markdown(table, args.rounds))


if __name__ == "__main__":
    main()
