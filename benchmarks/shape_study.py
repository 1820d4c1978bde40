"""Residual blocks removed, every other layer at one keep ratio, against uniform INT8 pruning.

Does a model shape beat uniform INT8 pruning at matched latency on the target, before any
search? Each fixed policy runs through `pipeline run --policy` on digits-hard (the product's full
recovery fine-tune, INT8 export, validation, test accuracy): the `--removed` blocks replaced by
identity with every other layer but the head at each of `--keeps`, and uniform INT8 pruning at
each of `--uniform`. Then every model is measured again in one interleaved session and scored on
the same 10,000 test images, and each shape is paired with each uniform model: the accuracy
difference with its exact 95% interval, and the latency ratio of the two from that session.

    python benchmarks/shape_study.py --seed 0 --removed layer3.1 layer4.1 \\
        --keeps 1.0 0.85 --uniform 0.6 0.66 0.72 --name shape_s0

Runs already finished under `--work` are reused. Writes `benchmarks/results/NAME.json`, `.md`
and `.png`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_table import _diff, test_correct
from suite import PROFILE, RESULTS, ROOT, remeasure, rows_from_runs


def shape_policy(removed: list[str], keep: float) -> dict[str, Any]:
    """The demo ResNet-18's policy with `removed` blocks gone and `keep` elsewhere, INT8."""
    from pipeline.core.policy import LayerAction, Policy, Precision, head_layer, policy_layers
    from pipeline.model.models import build_model

    model = build_model("resnet18", 10)
    head = head_layer(model)

    def gone(name: str) -> bool:
        return any(name.startswith(block + ".") for block in removed)

    layers = {
        name: LayerAction(1.0 if name == head else keep, Precision.INT8)
        for name in policy_layers(model)
        if not gone(name)
    }
    return Policy(layers, removed=tuple(removed)).to_dict()


def run_fixed(spec: str, out: Path, seed: int) -> Path:
    """`pipeline run --policy SPEC` into `out` (reused when it already finished)."""
    done = sorted(d for d in out.glob("*/") if (d / "report.json").is_file())
    if done:
        return done[-1]
    config = out.parent / "config.yaml"
    config.write_text("search: {baselines: false}\n")
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--target", str(PROFILE)]
    cmd += ["--data", "digits-hard", "--seed", str(seed), "--policy", spec, "--no-progress"]
    cmd += ["--config", str(config), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    done = sorted(d for d in out.glob("*/") if (d / "report.json").is_file())
    if proc.returncode != 0 or not done:
        sys.exit(f"{spec}: pipeline run failed: {proc.stderr.strip().splitlines()[-1:]}")
    print(json.dumps({"policy": spec, "run": str(done[-1])}), flush=True)
    return done[-1]


def pairs(rows: list[dict[str, Any]], correct: dict[str, Any]) -> list[dict[str, Any]]:
    """Every shape row against every uniform row: accuracy difference and latency ratio."""
    from pipeline.core.stats import paired_difference, paired_ratio

    index = {row["label"]: f"row{i}" for i, row in enumerate(rows)}
    rounds = {row["label"]: row["remeasured"]["self"]["rounds_ms"] for row in rows}
    found = []
    for shape in (r["label"] for r in rows if r["family"] == "shape"):
        for uniform in (r["label"] for r in rows if r["family"] == "uniform"):
            diff = paired_difference(correct[index[shape]], correct[index[uniform]])
            ratio = paired_ratio(rounds[shape], rounds[uniform])
            found.append(
                {"shape": shape, "uniform": uniform, "latency_ratio": ratio}
                | {"difference": diff.as_dict()}
            )
    return found


def markdown(rows: list[dict[str, Any]], found: list[dict[str, Any]]) -> str:
    lines = ["| model | test acc [95%] | median ms |", "|---|---|---|"]
    for row in rows:
        low, high = row["accuracy_ci95"]
        lines.append(
            f"| {row['label']} | {100 * row['rescored_accuracy']:.2f}% [{100 * low:.2f}, "
            f"{100 * high:.2f}] | {row['remeasured']['self']['median_ms']:.3f} |"
        )
    lines += ["", "| shape | uniform INT8 | latency ratio | shape minus uniform [95%] |"]
    lines.append("|---|---|---|---|")
    for pair in found:
        lines.append(
            f"| {pair['shape']} | {pair['uniform']} | {pair['latency_ratio']:.3f} | "
            f"{_diff(pair['difference'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker in (("shape", "o"), ("uniform", "s")):
        mine = [r for r in rows if r["family"] == family]
        ms = [r["remeasured"]["self"]["median_ms"] for r in mine]
        acc = [100 * r["rescored_accuracy"] for r in mine]
        err = [
            [a - 100 * r["accuracy_ci95"][0] for a, r in zip(acc, mine, strict=True)],
            [100 * r["accuracy_ci95"][1] - a for a, r in zip(acc, mine, strict=True)],
        ]
        ax.errorbar(ms, acc, yerr=err, fmt=marker, capsize=3, label=family)
        for x, y, r in zip(ms, acc, mine, strict=True):
            ax.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("median latency, one session (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--removed", nargs="*", default=["layer3.1", "layer4.1"])
    parser.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.85])
    parser.add_argument("--uniform", nargs="+", type=float, default=[0.6, 0.66, 0.72])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved measuring rounds")
    parser.add_argument("--work", type=Path, default=Path("shape-study-runs"))
    parser.add_argument("--name", default="shape_study")
    args = parser.parse_args()

    work = args.work.resolve() / f"seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, str, str, str]] = []  # (label, family, --policy, folder)
    for keep in args.keeps:
        path = work / f"removed_keep{keep}.json"
        path.write_text(json.dumps(shape_policy(args.removed, keep)))
        label = f"{' + '.join(args.removed) or 'nothing'} removed, keep {keep}"
        plan.append((label, "shape", str(path), f"removed_keep{keep}"))
    for keep in args.uniform:
        plan.append((f"uniform INT8 {keep}", "uniform", f"uniform:{keep}:int8", f"uniform{keep}"))
    runs = [run_fixed(spec, work / folder, args.seed) for _, _, spec, folder in plan]
    rows = rows_from_runs(runs, 0.0)  # fixed policies have no budget: one group, one session
    for row, (label, family, _, _) in zip(rows, plan, strict=True):
        row |= {"label": label, "family": family}
    remeasure(rows, args.rounds)
    correct = test_correct(runs, args.seed)
    for i, row in enumerate(rows):
        row["rescored_accuracy"] = float(correct[f"row{i}"].mean())
    found = pairs(rows, correct)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"seed": args.seed, "removed": args.removed, "rows": rows, "pairs": found}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, found))
    plot(rows, RESULTS / f"{args.name}.png")
    print(markdown(rows, found))


if __name__ == "__main__":
    main()
