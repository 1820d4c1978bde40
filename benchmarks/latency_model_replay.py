"""Replay a finished demo search through the latency model: how well would it have predicted?

Every candidate of the run's `episodes.jsonl` that was measured for real is taken in episode
order; the model predicts it (once it has enough measurements), then learns its measured
latency. Prints the median absolute relative error and writes it to --out. No measurement is
taken again except the per-layer latency shares of `original.onnx`, as the search does.

    python benchmarks/latency_model_replay.py RUN_DIR [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

from pipeline.core.policy import Policy, Precision, uniform_policy
from pipeline.core.profile import TargetProfile
from pipeline.measure.latency_model import LatencyModel
from pipeline.model.data import load_data
from pipeline.model.demo import demo_model
from pipeline.model.prune import prune_model
from pipeline.search.latency import candidate_features
from pipeline.search.space import build_space


def replay(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    setup = json.loads((run_dir / "search_setup.json").read_text())
    profile = TargetProfile.model_validate(manifest["profile"])
    shape = tuple(profile.input.shape)
    splits = load_data(None, shape, seed=manifest["seed"])
    original, _ = demo_model(splits, show_progress=False)
    space = build_space(
        original,
        profile,
        run_dir / "original.onnx",
        budget_ms=setup["budget_ms"],
        original_accuracy=0.0,
        original_latency_ms=setup["original_latency_ms"],
    )
    model = LatencyModel(space)
    fp32 = uniform_policy(original, 1.0, Precision.FP32)
    model.observe(candidate_features(model, original, fp32), setup["original_latency_ms"], None)
    rows = []
    for line in (run_dir / "episodes.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["source"] != "measured":
            continue
        policy = Policy.from_dict(record["policy"])
        pruned = copy.deepcopy(original)
        prune_model(pruned, policy, shape, profile.channel_multiple, profile.min_keep_ratio)
        x = candidate_features(model, pruned, policy)
        predicted = model.predict(x)
        model.observe(x, record["latency_ms"], predicted)
        rows.append([record["episode"], record["latency_ms"], predicted])
    errors = np.asarray(model.errors)
    return {
        "run_dir": str(run_dir),
        "measured": len(rows),
        "checked": len(errors),
        "median_abs_error": float(np.median(errors)) if len(errors) else None,
        "p90_abs_error": float(np.percentile(errors, 90)) if len(errors) else None,
        "episodes": [{"episode": e, "measured_ms": m, "predicted_ms": p} for e, m, p in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = replay(args.run_dir)
    summary = {k: v for k, v in result.items() if k != "episodes"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
