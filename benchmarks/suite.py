"""The benchmark suite: every search side by side with the baselines, measured in one process.

For each model (trained on digits by the suite itself, cached like the demo's baseline) and
each budget (a fraction of the original's measured latency), it runs `pipeline run` once per
agent, plus the same search driven by FLOPs instead of measured latency (AMC's proxy). Then
every model it compares (the original, the all-INT8 original, uniform pruning at matched
latency in FP32 and in the search's precision, and each search's deployed model) is measured
again in one process, on one runner, interleaved over rounds, so that every latency in a table
is comparable and ratios come from one measurement session.

    python benchmarks/suite.py                      # the full suite (hours on 2 cores)
    python benchmarks/suite.py --models resnet18 --agents ppo n2n --budgets 0.4
    python benchmarks/suite.py --runs RUN_DIR...    # tables from finished runs of one model
    python benchmarks/suite.py --merge A.json B.json --name suite   # one table of earlier results

Writes `benchmarks/results/suite.json`, `suite.md` and `suite.png`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROFILE = ROOT / "profiles" / "cpu.yaml"
AGENTS = ["ppo", "dqn", "sac", "td3", "decore", "n2n", "uniform", "random"]
# Tried as a third and left out: ShuffleNetV2 (torch-pruning cannot trace its channel shuffle),
# EfficientNet-B0 and MNASNet (the demo's 8-epoch recipe trains them to 27% and 10%); RegNetX
# prunes (its grouped convolutions stay whole) but is not benchmarked yet. `--models` takes any
# torchvision name.
MODELS = ["resnet18", "mobilenet_v2", "resnet34"]
# Training epochs on digits where the demo's 8 are not enough (ResNet-34 reaches 87% with 8)
EPOCHS = {"resnet34": 16}


def trained_weights(arch: str) -> Path | None:
    """The model trained on digits with the demo's recipe (None for the demo itself)."""
    if arch == "resnet18":
        return None  # the demo: `pipeline run` trains and caches it
    from pipeline.model.data import load_data
    from pipeline.model.demo import DEMO_EPOCHS, DEMO_INPUT, demo_model

    splits = load_data(None, DEMO_INPUT, seed=0)
    epochs = EPOCHS.get(arch, DEMO_EPOCHS)
    _, info = demo_model(splits, arch=arch, min_accuracy=0.9, epochs=epochs)
    return Path(info["weights"])


def run_one(arch: str, agent: str, budget: float, source: str, out: Path, args) -> dict[str, Any]:
    """One `pipeline run`; returns its row (from report.json and episodes.jsonl)."""
    config = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "search:\n"
        f"  budget_fraction: {budget}\n"
        "  budget_basis: fp32\n"
        f"  latency_source: {source}\n"
        f"  baselines: {'true' if agent == args.agents[0] and source == 'measured' else 'false'}\n"
    )
    weights = trained_weights(arch)
    model_args = [] if weights is None else ["--model", arch, "--weights", str(weights)]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--target", str(PROFILE)]
    cmd += ["--config", str(config), "--agent", agent, "--episodes", str(args.episodes)]
    cmd += ["--out", str(out / "runs"), "--no-progress", *model_args]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    runs = sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []
    run_dir = runs[-1] if runs else out / "runs"  # a run killed early leaves no directory
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if "deployed" not in report:  # killed early, or nothing shipped (the gate says why)
        # the CLI's one-line error is the last line of stderr
        lines = proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["?"]
        lines += report.get("gates", {}).get("failed", [])
        return {
            "model": arch,
            "agent": agent,
            "budget": budget,
            "source": source,
            "exit_code": proc.returncode,
            "error": lines[-1],
            "run_dir": str(run_dir),
        }
    return row_of(report, run_dir, arch, agent, budget, source, proc.returncode, wall)


def episodes_to_converge(run_dir: Path) -> int | None:
    """Episodes until the best reward so far is within 5% of its final value."""
    path = run_dir / "episodes.jsonl"
    if not path.is_file():  # a fixed policy (`--policy`) searched nothing
        return None
    rewards = [json.loads(line)["reward"] for line in path.open()]
    if not rewards:
        return None
    best, curve = float("-inf"), []
    for reward in rewards:
        best = max(best, reward)
        curve.append(best)
    final = curve[-1]
    return next(i + 1 for i, value in enumerate(curve) if value >= final - 0.05 * abs(final))


def row_of(report, run_dir, arch, agent, budget, source, code, wall) -> dict[str, Any]:
    search, deployed, original = report["search"], report["deployed"], report["original"]
    return {
        "model": arch,
        "agent": agent,
        "source": source,
        "budget": budget,
        "budget_ms": report["budget_ms"],
        "exit_code": code,
        "met_budget": report["met_budget"],
        "accuracy": deployed["accuracy"],
        "accuracy_drop": report["accuracy_drop"],
        "original_accuracy": original["accuracy"],
        # 95% intervals (reports written before they existed have none)
        "accuracy_ci95": deployed.get("accuracy_ci95"),
        "original_accuracy_ci95": original.get("accuracy_ci95"),
        "accuracy_drop_ci95": report.get("accuracy_drop_ci95"),
        "test_images": report.get("test_images"),
        "report_latency_ms": deployed["latency_ms"],
        "report_speedup": report["speedup"],
        "floor": report["floor"]["deployed"],
        "episodes": search["episodes"],
        "episodes_to_converge": episodes_to_converge(run_dir),
        "real": search["real_measurements"],
        "cached": search["cached_measurements"],
        "predicted": search.get("predicted_measurements", 0),
        "latency_model": search.get("latency_model"),
        "confirmation": search.get("confirmation", []),
        "wall_s": round(wall, 1),
        "baselines": report.get("baselines", {}),
        "run_dir": str(run_dir),
    }


def rows_from_runs(run_dirs: list[Path], budget: float | None) -> list[dict[str, Any]]:
    """Rows of finished `pipeline run` directories (the first one's baselines are used)."""
    rows = []
    for run_dir in run_dirs:
        report = json.loads((run_dir / "report.json").read_text())
        manifest = json.loads((run_dir / "manifest.json").read_text())
        search = report["search"]
        arch = manifest["model"].get("arch", "resnet18")
        source = search.get("latency_source") or "measured"
        if source == "measured" and not search.get("latency_model"):
            source = "measured, no latency model"
        label = budget if budget is not None else round(report["budget_ms"], 3)
        code = 0 if report["gates"]["passed"] else 1
        row = row_of(report, run_dir, arch, search["agent"], label, source, code, search["wall_s"])
        rows.append(row)
    return rows


def remeasure(rows: list[dict[str, Any]], rounds: int) -> None:
    """Every model of one (model, budget) group measured in one process, interleaved."""
    from pipeline.core.profile import load_profile
    from pipeline.core.stats import ratio_interval
    from pipeline.measure.bench import bench_artifact, bench_interleaved

    profile = load_profile(str(PROFILE))
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["model"], row["budget"]), []).append(row)
    for group in groups.values():
        first = Path(group[0]["run_dir"])
        paths = {"original": first / "original.onnx"}
        for name in group[0]["baselines"]:
            artifact = first / "baselines" / f"{name}.onnx"
            if artifact.is_file():
                paths[name] = artifact
        for i, row in enumerate(group):
            paths[f"row{i}"] = Path(row["run_dir"]) / "model.onnx"
        measured = bench_interleaved(lambda p: bench_artifact(profile, p), paths, rounds)
        original = measured["original"]
        table = {}
        for key, m in measured.items():
            ratio = ratio_interval(original["rounds_ms"], m["rounds_ms"])
            table[key] = {
                "median_ms": m["latency_ms"]["median"],
                "p90_ms": m["latency_ms"]["p90"],
                "speedup": original["latency_ms"]["median"] / m["latency_ms"]["median"],
                "speedup_ci95": ratio.as_list() if ratio else None,
                "rounds_ms": m["rounds_ms"],
                "floor_ratio": m["floor_ratio"],
            }
        for i, row in enumerate(group):
            row["remeasured"] = {
                "self": table[f"row{i}"],
                **{k: v for k, v in table.items() if not k.startswith("row")},
            }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | budget | row | median ms | p90 ms | speedup [95%] | test acc [95%] | "
        "vs original [95%] | met | "
        "converged at | real / predicted / cached | wall s | x floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    done: set[tuple[str, float]] = set()
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['model']} | {row['budget']} | {row['agent']} ({row['source']})"
                f" | failed: {row['error'][:80]} |" + " |" * 9
            )
            continue
        table = row.get("remeasured", {})
        group = (row["model"], row["budget"])
        if group not in done:
            done.add(group)
            for name in ("original", *row["baselines"]):
                m = table.get(name)
                acc = (
                    row["original_accuracy"]
                    if name == "original"
                    else row["baselines"][name]["accuracy"]
                )
                ci = (
                    row.get("original_accuracy_ci95")
                    if name == "original"
                    else row["baselines"][name].get("accuracy_ci95")
                )
                if m:
                    lines.append(
                        f"| {row['model']} | {row['budget']} | {name} | {m['median_ms']:.3f} | "
                        f"{m['p90_ms']:.3f} | {_speedup(m)} | {_acc(acc, ci)} | "
                        f"{100 * (acc - row['original_accuracy']):+.2f} pt | | | | | "
                        f"{m['floor_ratio'] or 0:.0f} |"
                    )
        m = table["self"]
        name = row["agent"] + ("" if row["source"] == "measured" else f" ({row['source']})")
        drop = row.get("accuracy_drop_ci95")
        versus = f"{-100 * row['accuracy_drop']:+.2f} pt"
        if drop:  # the paired interval of deployed minus original
            versus += f" [{-100 * drop[1]:+.2f}, {-100 * drop[0]:+.2f}]"
        accuracy = _acc(row["accuracy"], row.get("accuracy_ci95"))
        lines.append(
            f"| {row['model']} | {row['budget']} | {name} | {m['median_ms']:.3f} | "
            f"{m['p90_ms']:.3f} | {_speedup(m)} | {accuracy} | "
            f"{versus} | {'yes' if row['met_budget'] else 'no'} | "
            f"{row['episodes_to_converge']} / {row['episodes']} | "
            f"{row['real']} / {row['predicted']} / {row['cached']} | {row['wall_s']:.0f} | "
            f"{m['floor_ratio'] or 0:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _acc(accuracy: float, ci: list[float] | None) -> str:
    """'91.44% [90.88, 91.97]', or the bare accuracy when the run recorded no interval."""
    return f"{accuracy:.2%}" + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")


def _speedup(m: dict[str, Any]) -> str:
    ci = m.get("speedup_ci95")
    return f"{m['speedup']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _label(row: dict[str, Any]) -> str:
    source = "" if row["source"] == "measured" else f" ({row['source']})"
    return f"{row['agent']}{source} @{row['budget']}"


def _plot_baselines(ax: Any, row: dict[str, Any]) -> None:
    """The original and the baselines of a group, as grey squares."""
    accuracies = {"original": row["original_accuracy"]}
    accuracies |= {k: v["accuracy"] for k, v in row["baselines"].items()}
    for name, acc in accuracies.items():
        m = row["remeasured"].get(name)
        if m:
            ax.scatter(m["median_ms"], 100 * acc, marker="s", c="grey")
            ax.annotate(name, (m["median_ms"], 100 * acc), fontsize=7, color="grey")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Latency against test accuracy, one panel per model; FLOPs-driven searches as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "remeasured" in r]
    models = sorted({r["model"] for r in ok})
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(7 * max(len(models), 1), 5))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, model in zip(axes, models, strict=False):
        seen: set[float] = set()
        for i, row in enumerate(r for r in ok if r["model"] == model):
            if row["budget"] not in seen:
                seen.add(row["budget"])
                _plot_baselines(ax, row)
                ax.axvline(row["budget_ms"], ls=":", c="tab:red", lw=0.8)
            m = row["remeasured"]["self"]
            marker = "x" if row["source"] == "flops" else "o"
            point = (m["median_ms"], 100 * row["accuracy"])
            ax.scatter(*point, marker=marker, label=f"{i}: {_label(row)}")
        ax.legend(fontsize=7, loc="lower right")
        ax.set(title=model, xlabel="latency ms (median, one process)", ylabel="test accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PROGRESS_KEYS = ("model", "budget", "agent", "source", "accuracy", "met_budget", "real")


def run_suite(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (model, budget, agent) run, plus the FLOPs-driven one per (model, budget)."""
    rows = []
    for arch in args.models:
        for budget in args.budgets:
            plan = [(a, "measured") for a in args.agents]
            plan += [(args.flops_agent, "flops")] if args.flops_agent != "none" else []
            for agent, source in plan:
                out = args.work / arch / f"{budget}" / f"{agent}-{source}"
                rows.append(run_one(arch, agent, budget, source, out, args))
                print(json.dumps({k: rows[-1].get(k) for k in PROGRESS_KEYS}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--agents", nargs="+", default=AGENTS)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.4, 0.6])
    parser.add_argument(
        "--flops-agent", default="ppo", help="agent of the FLOPs-driven row ('none': no such row)"
    )
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pipeline-suite"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--runs", nargs="+", type=Path, help="finished run directories instead")
    parser.add_argument("--budget-label", type=float, help="the budget fraction of --runs")
    parser.add_argument("--name", default="suite", help="file name of the results")
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="result JSON files (each already re-measured)"
    )
    args = parser.parse_args()
    if args.merge:  # groups were each measured in one process; they are not measured again
        rows = [row for path in args.merge for row in json.loads(path.read_text())]
    else:
        rows = rows_from_runs(args.runs, args.budget_label) if args.runs else run_suite(args)
        remeasure(rows, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(rows))
    plot(rows, args.out / f"{args.name}.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
