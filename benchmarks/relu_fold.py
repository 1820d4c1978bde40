"""What folding each Relu into the INT8 layer before it saves (`exporters.qdq_graph`).

The digits-hard baseline ResNet-18 (seed 0, 48x48), unpruned and uniformly pruned (no
fine-tune: latency and fidelity do not need one), exported to INT8 with the profile's scheme
twice, with and without the fold; then every graph measured in one interleaved session
(`--rounds`), and scored on the 10,000 test images: accuracy, and agreement of the top-1 class
with the FP32 graph it came from.

    python benchmarks/relu_fold.py --keeps 1.0 0.4 --rounds 10

Writes `benchmarks/results/relu_fold.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import PROFILE, RESULTS


def graphs(keeps: list[float], folder: Path, seed: int) -> tuple[dict[str, Path], Any]:
    """{"keep K fp32" | "keep K unfolded" | "keep K folded" -> graph}, and the test split."""
    from exporters import export_onnx, quantize_onnx
    from pipeline.core.policy import Precision, policy_layers, uniform_policy
    from pipeline.core.profile import load_profile
    from pipeline.model.data import load_data
    from pipeline.model.demo import DEMO_INPUT, demo_model
    from pipeline.search.materialize import calibration, materialize

    profile = load_profile(PROFILE)
    splits = load_data("digits-hard", DEMO_INPUT, seed=seed)
    model, _ = demo_model(splits, show_progress=False)
    calib = calibration(splits, profile.int8.calib_samples)
    out: dict[str, Path] = {}
    for keep in keeps:
        pruned = materialize(model, uniform_policy(model, keep, Precision.FP32), profile).model
        fp32 = export_onnx(pruned, DEMO_INPUT, folder / f"keep{keep}_fp32.onnx")
        int8 = dict.fromkeys(policy_layers(pruned), Precision.INT8)
        out[f"keep {keep} fp32"] = fp32
        for fold in (False, True):
            name = f"keep {keep} {'folded' if fold else 'unfolded'}"
            path = folder / f"{name.replace(' ', '_')}.onnx"
            quantize_onnx(fp32, path, int8, profile.int8, calib, fold_relus=fold)
            out[name] = path
    return out, splits.test


def measure(paths: dict[str, Path], rounds: int) -> dict[str, Any]:
    from pipeline.core.profile import load_profile
    from pipeline.measure.bench import bench_interleaved
    from pipeline.measure.measure_worker import MeasureWorker

    with MeasureWorker(load_profile(PROFILE), timeout_s=600) as worker:
        return bench_interleaved(worker.measure, paths, rounds)


def rows(keeps: list[float], paths: dict[str, Path], measured: dict[str, Any], test: Any) -> list:
    from exporters import run_onnx
    from pipeline.core.stats import correct_of, paired_difference, ratio_interval
    from pipeline.model.evaluate import stack

    inputs, labels = stack(test)
    out = []
    for keep in keeps:
        logits = {
            kind: run_onnx(paths[f"keep {keep} {kind}"], inputs, threads=2)
            for kind in ("fp32", "unfolded", "folded")
        }
        top = {kind: x.argmax(1) for kind, x in logits.items()}
        correct = {kind: correct_of(x, labels) for kind, x in logits.items()}
        sides = {kind: measured[f"keep {keep} {kind}"] for kind in ("unfolded", "folded")}
        ratio = ratio_interval(sides["folded"]["rounds_ms"], sides["unfolded"]["rounds_ms"])
        nodes = {k: len(onnx.load(str(paths[f"keep {keep} {k}"])).graph.node) for k in sides}
        out.append(
            {
                "keep": keep,
                "test_images": len(labels),
                "nodes": nodes,
                "median_ms": {k: v["latency_ms"]["median"] for k, v in sides.items()},
                "rounds_ms": {k: v["rounds_ms"] for k, v in sides.items()},
                "folded_over_unfolded": [ratio.value, *ratio.as_list()] if ratio else None,
                "test_accuracy": {k: float(c.mean()) for k, c in correct.items()},
                "folded_minus_unfolded": paired_difference(
                    correct["folded"], correct["unfolded"]
                ).as_dict(),
                "agreement_with_fp32": {
                    k: float((top[k] == top["fp32"]).mean()) for k in ("unfolded", "folded")
                },
            }
        )
    return out


def _acc(accuracy: float, n: int) -> str:
    """An accuracy with its Wilson 95% interval."""
    from pipeline.core.stats import accuracy_interval

    ci = accuracy_interval(round(accuracy * n), n)
    return f"{accuracy:.2%} [{100 * ci.low:.2f}, {100 * ci.high:.2f}]"


def markdown(table: list[dict[str, Any]], rounds: int) -> str:
    lines = [
        f"| keep | nodes unfolded -> folded | unfolded ms | folded ms | folded / unfolded "
        f"[95%], {rounds} rounds | test acc [95%] unfolded, folded | folded minus unfolded [95%] | "
        "top-1 agreement with FP32, unfolded, folded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ratio, d = r["folded_over_unfolded"], r["folded_minus_unfolded"]
        acc, agree = r["test_accuracy"], r["agreement_with_fp32"]
        lines.append(
            f"| {r['keep']} | {r['nodes']['unfolded']} -> {r['nodes']['folded']} | "
            f"{r['median_ms']['unfolded']:.3f} | {r['median_ms']['folded']:.3f} | "
            f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}] | "
            f"{_acc(acc['unfolded'], r['test_images'])}, {_acc(acc['folded'], r['test_images'])} | "
            f"{100 * d['difference']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] | "
            f"{agree['unfolded']:.2%}, {agree['folded']:.2%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.4])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths, test = graphs(args.keeps, Path(tmp), args.seed)
        timed = {k: p for k, p in paths.items() if not k.endswith("fp32")}
        measured = measure(timed, args.rounds)
        table = rows(args.keeps, paths, measured, test)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"profile": str(PROFILE), "seed": args.seed, "rounds": args.rounds, "rows": table}
    (RESULTS / "relu_fold.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(table, args.rounds)
    (RESULTS / "relu_fold.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
