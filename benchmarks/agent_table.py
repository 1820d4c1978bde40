"""Every agent and every reward on digits-hard, at one budget and one seed, in one table.

Runs `pipeline run --data digits-hard` once per agent with the default reward, and once per
other reward with the default agent, all with the same number of candidates. The first run
(the default agent and reward) also builds the baselines: uniform pruning at its latency in
FP32 and in INT8, and the unpruned INT8 model. Then every model is measured again in one
process, interleaved over rounds (so every latency and ratio in the table comes from one
session), and scored again on the same 10,000 test images, so that each run's accuracy is
compared with the default's as a paired difference with its exact 95% interval. The unpruned
INT8 model's row shows its own paired difference with uniform INT8: the most any model no more
accurate than the unpruned one could gain over uniform INT8 at that latency.

    python benchmarks/agent_table.py --seed 0 --budget-fraction 0.3 --episodes 40
    python benchmarks/agent_table.py --agents n2n --budget-fraction 0.6 --budget-basis fastest
    python benchmarks/agent_table.py --runs RUN_DIR...   # the table from finished runs

Writes `benchmarks/results/agent_table.json`, `.md` and `.png` (`--name` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import PROFILE, RESULTS, ROOT, remeasure, rows_from_runs

AGENTS = ["ppo", "dqn", "sac", "td3", "decore", "n2n", "random"]
REWARDS = ["budget", "amc", "accuracy"]  # the first is the default
# uniform_int8_at_floor: runs of the accuracy-floor objective (`benchmarks/floor_objective.py`)
BASELINES = ("int8", "uniform", "uniform_int8", "uniform_int8_at_floor")


def plan(agents: list[str], rewards: list[str]) -> list[tuple[str, str]]:
    """(agent, reward) pairs: every agent with the default reward, then every other reward
    with the default agent (the first of `agents`)."""
    return [(a, rewards[0]) for a in agents] + [(agents[0], r) for r in rewards[1:]]


def run_one(agent: str, reward: str, args: argparse.Namespace, baselines: bool) -> Path | None:
    """One `pipeline run`; its run directory, or None when it wrote no report."""
    out = args.work / f"{agent}-{reward}"
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(
        f"search: {{budget_fraction: {args.budget_fraction}, budget_basis: {args.budget_basis}, "
        f"reward: {reward}, "
        f"baselines: {'true' if baselines else 'false'}}}\n"
    )
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--target", str(PROFILE)]
    cmd += ["--data", "digits-hard", "--seed", str(args.seed), "--config", str(config)]
    cmd += ["--agent", agent, "--episodes", str(args.episodes), "--no-progress"]
    cmd += ["--out", str(out / "runs")]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    runs = sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []
    done = [r for r in runs if (r / "report.json").is_file()]
    status = {"agent": agent, "reward": reward, "exit": proc.returncode}
    print(json.dumps(status | {"wall_s": round(time.time() - start)}), flush=True)
    if not done:
        print(proc.stderr.strip().splitlines()[-1:] or ["no output"], flush=True)
        return None
    return done[-1]


def shipped(run_dir: Path) -> bool:
    return "deployed" in json.loads((run_dir / "report.json").read_text())


def failed_row(run_dir: Path) -> dict[str, Any]:
    """A run that shipped nothing: its agent, reward and one-line verdict."""
    report = json.loads((run_dir / "report.json").read_text())
    search = report.get("search", {})
    return {
        "agent": search.get("agent"),
        "reward": search.get("reward", "budget"),
        "error": report.get("message", "nothing shipped"),
        "run_dir": str(run_dir),
    }


def test_correct(run_dirs: list[Path], seed: int) -> dict[str, np.ndarray]:
    """Per-image correctness on the test split of every deployed model and baseline."""
    from exporters import run_onnx
    from pipeline.core.stats import correct_of
    from pipeline.model.data import load_data
    from pipeline.model.demo import DEMO_INPUT
    from pipeline.model.evaluate import stack

    inputs, labels = stack(load_data("digits-hard", DEMO_INPUT, seed=seed).test)
    paths = {f"row{i}": run / "model.onnx" for i, run in enumerate(run_dirs)}
    paths["original"] = run_dirs[0] / "original.onnx"
    paths |= {n: run_dirs[0] / "baselines" / f"{n}.onnx" for n in BASELINES}
    return {
        name: correct_of(run_onnx(path, inputs, threads=2), labels)
        for name, path in paths.items()
        if path.is_file()
    }


def compare(rows: list[dict[str, Any]], correct: dict[str, np.ndarray]) -> None:
    """Each row's test accuracy paired with the default's and uniform INT8's; on the first
    row, the unpruned INT8 model's paired with uniform INT8's (`headroom`): a model no more
    accurate than the unpruned one can beat uniform INT8 at matched latency by at most that."""
    from pipeline.core.stats import paired_difference

    if "int8" in correct and "uniform_int8" in correct:
        rows[0]["headroom"] = paired_difference(correct["int8"], correct["uniform_int8"]).as_dict()
    for i, row in enumerate(rows):
        mine = correct[f"row{i}"]
        row["rescored_accuracy"] = float(mine.mean())
        row["versus"] = {
            name: paired_difference(mine, correct[key]).as_dict()
            for name, key in (("default", "row0"), ("uniform_int8", "uniform_int8"))
            if key in correct
        }


def _label(search: dict[str, Any]) -> str:
    """The reward column: the reward and how the pick was scaled, or a fixed policy's name."""
    if search.get("agent") == "fixed":
        spec = str(search.get("policy", ""))
        return spec if spec.startswith("uniform:") else Path(spec).stem
    reward = search.get("reward", "budget")
    if search.get("objective") == "floor":
        return f"{reward}, accuracy floor"
    return reward + _widened(search.get("fill"))


def _widened(fill: dict[str, Any] | None) -> str:
    """How the run's pick was scaled to the budget's aim (`pipeline.run.fill`), if it was."""
    if fill is None:
        return ""
    return f", scaled x{fill['scale']:.2f}" if fill["scale"] else ", not scaled"


def _diff(d: dict[str, Any] | None) -> str:
    if d is None:
        return ""
    text = f"{100 * d['difference']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
    return text + (", noise" if d["low"] <= 0 <= d["high"] else "")


def _name(row: dict[str, Any]) -> str:
    """The agent, and what drove it when not measured latency (`n2n (flops)`)."""
    return row["agent"] + ("" if row["source"] == "measured" else f" ({row['source']})")


def _met(row: dict[str, Any]) -> str:
    """'yes (0.414)' against the run's budget; blank for a fixed policy (`--policy`, none)."""
    if row["budget_ms"] is None:
        return ""
    return f"{'yes' if row['met_budget'] else 'no'} ({row['budget_ms']:.3f})"


def markdown(rows: list[dict[str, Any]]) -> str:
    from suite import _acc, _speedup

    lines = [
        "| agent | reward | test acc [95%] | minus default [95%] | minus uniform INT8 [95%] | "
        "median ms | speedup [95%] | met budget | real / predicted / cached | search s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = rows[0]
    for name in ("original", *BASELINES):
        m = first["remeasured"].get(name)
        if m is None:
            continue
        side = first["baselines"].get(name, {})
        acc = first["original_accuracy"] if name == "original" else side.get("accuracy", 0.0)
        ci = (
            first.get("original_accuracy_ci95") if name == "original" else side.get("accuracy_ci95")
        )
        keep = f" (keep {side['keep_ratio']:.3f})" if "keep_ratio" in side else ""
        headroom = _diff(first.get("headroom")) if name == "int8" else ""
        lines.append(
            f"| {name}{keep} | | {_acc(acc, ci)} | | {headroom} | {m['median_ms']:.3f} | "
            f"{_speedup(m)} | | | |"
        )
    for row in rows:
        if "error" in row:
            verdict = f"failed: {row['error']}"
            lines.append(f"| {row['agent']} | {row['reward']} | {verdict} |" + " |" * 7)
            continue
        m, versus = row["remeasured"]["self"], row["versus"]
        lines.append(
            f"| {_name(row)} | {row['reward']} | {_acc(row['accuracy'], row['accuracy_ci95'])}"
            f" | {_diff(versus.get('default')) if row is not first else ''} | "
            f"{_diff(versus.get('uniform_int8'))} | {m['median_ms']:.3f} | {_speedup(m)} | "
            f"{_met(row)} | "
            f"{row['real']} / {row['predicted']} / {row['cached']} | {row['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Latency against test accuracy (with its interval); baselines as grey squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    first = rows[0]
    for name in ("original", *BASELINES):
        m = first["remeasured"].get(name)
        side = first["baselines"].get(name)
        acc = first["original_accuracy"] if name == "original" else (side or {}).get("accuracy")
        if m is not None and acc is not None:
            ax.scatter(m["median_ms"], 100 * acc, marker="s", c="grey")
            ax.annotate(name, (m["median_ms"], 100 * acc), fontsize=7, color="grey")
    for row in (r for r in rows if "error" not in r):
        m, ci = row["remeasured"]["self"], row["accuracy_ci95"]
        acc = 100 * row["accuracy"]
        err = [[acc - 100 * ci[0]], [100 * ci[1] - acc]]
        label = f"{_name(row)} / {row['reward']}"
        ax.errorbar(m["median_ms"], acc, yerr=err, fmt="o", capsize=3, label=label)
    if first["budget_ms"] is not None:  # none under the accuracy-floor objective
        ax.axvline(first["budget_ms"], ls=":", c="tab:red", lw=0.8)
    ax.legend(fontsize=7, loc="lower right")
    ax.set(xlabel="latency ms (median, one session)", ylabel="test accuracy % [95%]")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", nargs="+", default=AGENTS)
    parser.add_argument("--rewards", nargs="+", default=REWARDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-fraction", type=float, default=0.3)
    parser.add_argument(
        "--budget-basis",
        choices=["fp32", "fastest"],
        default="fp32",
        help="what the fraction multiplies: the original (fp32) or its fastest precision",
    )
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds")
    parser.add_argument("--work", type=Path, default=Path("agent-table-runs"))
    parser.add_argument("--runs", nargs="+", type=Path, help="finished runs, default first")
    parser.add_argument("--name", default="agent_table")
    args = parser.parse_args()
    run_dirs = args.runs
    if not run_dirs:
        pairs = plan(args.agents, args.rewards)
        found = [run_one(a, r, args, baselines=i == 0) for i, (a, r) in enumerate(pairs)]
        run_dirs = [d for d in found if d is not None]
    ok = [d for d in run_dirs if shipped(d)]
    if not ok:
        sys.exit("no run shipped a model")
    rows = rows_from_runs(ok, args.budget_fraction)
    for row, run in zip(rows, ok, strict=True):
        search = json.loads((run / "report.json").read_text())["search"]
        row["reward"] = _label(search)
    remeasure(rows, args.rounds)
    compare(rows, test_correct(ok, args.seed))
    rows += [failed_row(d) for d in run_dirs if not shipped(d)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2, default=str))
    (RESULTS / f"{args.name}.md").write_text(markdown(rows))
    plot(rows, RESULTS / f"{args.name}.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
