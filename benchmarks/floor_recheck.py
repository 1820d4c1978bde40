"""Re-measure what a finished accuracy-floor run decided, side by side on the target.

Two checks on `benchmarks/floor_objective.py` runs (digits-hard, `profiles/cpu.yaml`), each one
interleaved session; graphs are exported untrained (latency does not depend on the weights):

- `rungs`: a run's pick (an episode of its search) scaled by the descent's factors, against the
  pick: is a descended shape faster, and by how much?
- `keeps`: each run's deployed model against uniform INT8 at a given keep ratio (for example the
  one a bisection on the test set chose for the same data and seed); results keyed by the
  `SEED:RUN_DIR:KEEP` given.

    python benchmarks/floor_recheck.py rungs RUN_DIR --episode 19 --seed 0 --scales 0.925,0.8875
    python benchmarks/floor_recheck.py keeps 0:RUN_DIR:0.441 1:RUN_DIR:0.409 --rounds 20

Writes `benchmarks/results/NAME.json` (`--name`).
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


def _baseline(seed: int) -> tuple[Any, Any, Any]:
    """The digits-hard baseline model of `seed`, its calibration images and the profile."""
    from pipeline.core.profile import load_profile
    from pipeline.model.data import load_data
    from pipeline.model.demo import DEMO_INPUT, demo_model
    from pipeline.search.materialize import calibration

    profile = load_profile(PROFILE)
    splits = load_data("digits-hard", DEMO_INPUT, seed=seed)
    model, _ = demo_model(splits, show_progress=False)
    return model, calibration(splits, profile.int8.calib_samples), profile


def _export(model: Any, policy: Any, profile: Any, calib: Any, path: Path) -> list[int]:
    """The policy's graph, untrained, at `path`; returns each stage's first conv width."""
    from pipeline.search.materialize import export_graph, layer_precisions, materialize

    pruned = materialize(model, policy, profile).model
    export_graph(pruned, layer_precisions(pruned, policy), profile, path, calib, 17)
    return [
        m.out_channels for n, m in pruned.named_modules() if n == "conv1" or n.endswith(".0.conv1")
    ]


def _session(profile: Any, graphs: dict[str, Path], rounds: int) -> dict[str, list[float]]:
    from pipeline.measure.bench import bench_interleaved
    from pipeline.measure.measure_worker import MeasureWorker

    with MeasureWorker(profile, timeout_s=900) as worker:
        sides = bench_interleaved(worker.measure, graphs, rounds)
    return {name: side["rounds_ms"] for name, side in sides.items()}


def _ratio(numerator: list[float], denominator: list[float]) -> dict[str, Any]:
    from pipeline.core.stats import paired_ratio, ratio_interval

    ci = ratio_interval(numerator, denominator)
    return {"ratio": paired_ratio(numerator, denominator), "ci95": ci.as_list() if ci else None}


def rungs(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from pipeline.core.policy import Policy, head_layer
    from pipeline.run.descent import scaled

    model, calib, profile = _baseline(args.seed)
    lines = (args.run / "episodes.jsonl").read_text().splitlines()
    episode = next(e for e in map(json.loads, lines) if e["episode"] == args.episode)
    pick = Policy.from_dict(episode["policy"])
    scales = [1.0, *(float(s) for s in args.scales.split(","))]
    graphs, widths = {}, {}
    for scale in scales:
        policy = scaled(pick, scale, head_layer(model), profile.min_keep_ratio)
        graphs[f"x{scale}"] = folder / f"x{scale}.onnx"
        widths[f"x{scale}"] = _export(model, policy, profile, calib, graphs[f"x{scale}"])
    rounds = _session(profile, graphs, args.rounds)
    return {
        name: {"widths": widths[name], **_ratio(rounds[name], rounds["x1.0"])} for name in graphs
    }


def keeps(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from pipeline.core.policy import Precision, uniform_policy

    graphs, keep_of = {}, {}
    for i, spec in enumerate(args.runs):  # one seed may come with several runs: keyed by spec
        seed, run, keep = spec.split(":")
        model, calib, profile = _baseline(int(seed))
        policy = uniform_policy(model, float(keep), Precision.INT8)
        graphs[f"uniform {spec}"] = folder / f"uniform{i}.onnx"
        _export(model, policy, profile, calib, graphs[f"uniform {spec}"])
        graphs[f"deployed {spec}"] = Path(run) / "model.onnx"
        keep_of[spec] = float(keep)
    rounds = _session(profile, graphs, args.rounds)
    return {
        spec: {"keep": keep, **_ratio(rounds[f"uniform {spec}"], rounds[f"deployed {spec}"])}
        for spec, keep in keep_of.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    one = sub.add_parser("rungs", help="a pick and its scaled shapes, side by side")
    one.add_argument("run", type=Path)
    one.add_argument("--episode", type=int, required=True)
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--scales", required=True)
    two = sub.add_parser("keeps", help="deployed models against uniform INT8 at given keeps")
    two.add_argument("runs", nargs="+", help="SEED:RUN_DIR:KEEP")
    for command in (one, two):
        command.add_argument("--rounds", type=int, default=20)
        command.add_argument("--name", default=f"floor_recheck_{command.prog.split()[-1]}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = (rungs if args.check == "rungs" else keeps)(args, Path(tmp))
    out = {"check": args.check, "rounds": args.rounds, "argv": sys.argv[1:], "result": result}
    path = RESULTS / f"{args.name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
