"""Which candidate score predicts the shipped model? Rank correlation and cost per candidate.

The search ranks candidates by a cheap score (a short fine-tune, then validation accuracy);
what ships is the same policy after the full recovery fine-tune, scored on test. A score is only
useful if it ranks policies the way the shipped models rank. On `digits-hard`, for channel
policies spanning uniform and per-layer keep ratios from 0.3 to 1.0, each in FP32 and INT8:

- the truth: the full recovery fine-tune (the run's `finetune` defaults, distilled), exported
  like the deployed model (full INT8 calibration), test accuracy on 10,000 images;
- every scoring method: what `evaluate_candidate` would give it (64-image INT8 calibration,
  validation accuracy), and its wall time per candidate on this machine.

Spearman's rank correlation between each score and the truth, with a bootstrap interval over
policies, is written with the costs to JSON, Markdown and a plot.

    python benchmarks/candidate_score.py [--policies 10] [--out benchmarks/results/candidate_score]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.core.config import FinetuneConfig
from pipeline.core.policy import Policy, Precision, policy_layers
from pipeline.core.profile import load_profile
from pipeline.core.stats import accuracy_interval, correct_of
from pipeline.model.data import load_data
from pipeline.model.demo import DEMO_INPUT, demo_model
from pipeline.model.evaluate import stack
from pipeline.model.finetune import recalibrate_batchnorm, train
from pipeline.model.prune import prune_model

CANDIDATE_CALIB = 64  # as pipeline.search.candidate.CANDIDATE_CALIB_SAMPLES
BN_BATCHES = 20
PRECISIONS = (Precision.FP32, Precision.INT8)


@dataclasses.dataclass(frozen=True)
class Method:
    """A way to score a pruned candidate: fine-tune steps, distillation weight, BN batches."""

    name: str
    steps: int
    kd_weight: float = 1.0
    bn_batches: int = 0
    bn_first: bool = False  # recalibrate before the fine-tune instead of after


METHODS = (
    Method("prune only", 0),
    Method("bn", 0, bn_batches=BN_BATCHES),
    Method("ft30 (current)", 30),
    Method("ft30 + bn", 30, bn_batches=BN_BATCHES),
    Method("bn + ft30", 30, bn_batches=BN_BATCHES, bn_first=True),
    Method("ft30 kd0", 30, kd_weight=0.0),
    Method("ft30 kd3", 30, kd_weight=3.0),
    Method("ft60", 60),
    Method("ft60 + bn", 60, bn_batches=BN_BATCHES),
)


def channel_policies(original: nn.Module, groups: dict[str, list[str]], count: int) -> list:
    """Half uniform keep ratios from 0.3 to 0.9, half random per group in [0.3, 1.0]."""
    rng = np.random.default_rng(0)
    uniform = np.linspace(0.3, 0.9, count // 2)
    out = []
    for keep in uniform:
        out.append((f"uniform {keep:.2f}", dict.fromkeys(groups, float(keep))))
    for i in range(count - len(uniform)):
        out.append((f"per-layer {i}", {g: float(rng.uniform(0.3, 1.0)) for g in groups}))
    return out


def to_policy(ratios: dict[str, float], groups: dict[str, list[str]], precision) -> Policy:
    from pipeline.core.policy import LayerAction

    layers = {
        layer: LayerAction(ratios[g], precision)
        for g, members in groups.items()
        for layer in members
    }
    return Policy(layers)


class Study:
    """Everything the policies share: data, the original, the profile, the inputs."""

    def __init__(self, profile_name: str) -> None:
        self.profile = load_profile(profile_name)
        self.splits = load_data("digits-hard", DEMO_INPUT, seed=0)
        self.original, self.info = demo_model(self.splits, show_progress=True)
        self.val_x, self.val_y = stack(self.splits.val)
        self.test_x, self.test_y = stack(self.splits.test)
        calib = stack(self.splits.calib)[0]
        self.calib_full, self.calib_small = calib, calib[:CANDIDATE_CALIB]
        self.recovery = FinetuneConfig().spec(0)

    def pruned(self, policy: Policy) -> nn.Module:
        model = copy.deepcopy(self.original)
        p = self.profile
        prune_model(model, policy, DEMO_INPUT, p.channel_multiple, p.min_keep_ratio)
        return model

    def logits(self, model: nn.Module, precision, inputs, calib) -> np.ndarray:
        from exporters import export_onnx, quantize_onnx, run_onnx

        with tempfile.TemporaryDirectory() as tmp:
            fp32, out = Path(tmp) / "fp32.onnx", Path(tmp) / "model.onnx"
            export_onnx(model, DEMO_INPUT, fp32)
            quantize_onnx(
                fp32, out, dict.fromkeys(policy_layers(model), precision), self.profile.int8, calib
            )
            return run_onnx(out, inputs, threads=self.profile.threads)

    def truth(self, policy: Policy) -> dict[str, Any]:
        """Full recovery fine-tune, exported like the deployed model, on test, per precision."""
        model = self.pruned(policy)
        start = time.perf_counter()
        train(model, self.splits.train, self.recovery, self.original, "recovery", False)
        seconds = time.perf_counter() - start
        out: dict[str, Any] = {"finetune_s": seconds}
        for precision in PRECISIONS:
            correct = correct_of(
                self.logits(model, precision, self.test_x, self.calib_full), self.test_y
            )
            ci = accuracy_interval(int(correct.sum()), len(correct))
            out[precision.value] = {"accuracy": ci.value, "ci95": ci.as_list()}
        return out

    def score(self, policy: Policy, method: Method) -> dict[str, Any]:
        """The method's validation score per precision, and its seconds per candidate."""
        start = time.perf_counter()
        model = self.pruned(policy)
        self._prepare(model, method)
        shared = time.perf_counter() - start
        out: dict[str, Any] = {}
        for precision in PRECISIONS:
            t0 = time.perf_counter()
            logits = self.logits(model, precision, self.val_x, self.calib_small)
            acc = float(correct_of(logits, self.val_y).mean())
            out[precision.value] = {"score": acc, "seconds": shared + time.perf_counter() - t0}
        return out

    def _prepare(self, model: nn.Module, method: Method) -> None:
        bn: Callable[[], Any] = lambda: recalibrate_batchnorm(  # noqa: E731
            model, self.splits.train, method.bn_batches
        )
        if method.bn_batches and method.bn_first:
            bn()
        if method.steps:
            spec = dataclasses.replace(
                self.recovery, steps=method.steps, kd_weight=method.kd_weight
            )
            train(model, self.splits.train, spec, self.original, "candidate", False)
        if method.bn_batches and not method.bn_first:
            bn()


def spearman_with_interval(x: list[float], y: list[float], draws: int = 2000) -> dict[str, Any]:
    """Spearman's rho and a 95% percentile bootstrap interval over policies."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x), np.asarray(y)
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(draws):
        idx = rng.integers(0, len(x), len(x))
        if len(set(x[idx])) > 1 and len(set(y[idx])) > 1:
            boots.append(spearmanr(x[idx], y[idx]).statistic)
    low, high = np.nanpercentile(boots, [2.5, 97.5])
    return {"rho": rho, "ci95": [float(low), float(high)]}


def add_shortfall(result: dict[str, Any]) -> None:
    """Per method, how far its score falls below the shipped accuracy (points, mean and max).

    Rank correlation is not all a score needs: the search also compares pruned candidates
    with the unpruned one, which is scored as trained (no fine-tune). A score that
    underestimates what a pruned policy becomes steers the search away from pruning.
    """
    rows = result["rows"]
    truth = np.array([r["truth"][p.value]["accuracy"] for r in rows for p in PRECISIONS])
    for name, record in result["methods"].items():
        score = np.array([r["scores"][name][p.value]["score"] for r in rows for p in PRECISIONS])
        gap = (truth - score) * 100
        record["shortfall_points"] = {"mean": float(gap.mean()), "max": float(gap.max())}


def run(count: int, profile: str) -> dict[str, Any]:
    from pipeline.search.space import coupling_groups

    study = Study(profile)
    groups: dict[str, list[str]] = {}
    for layer, group in coupling_groups(study.original, DEMO_INPUT).items():
        groups.setdefault(group, []).append(layer)
    rows = []
    for name, ratios in channel_policies(study.original, groups, count):
        policy = to_policy(ratios, groups, Precision.FP32)
        row = {"policy": name, "mean_keep": float(np.mean(list(ratios.values())))}
        row["truth"] = study.truth(policy)
        row["scores"] = {m.name: study.score(policy, m) for m in METHODS}
        rows.append(row)
        print(json.dumps({"policy": name, "truth": row["truth"]}), flush=True)
    return summarise(rows, study)


def summarise(rows: list[dict[str, Any]], study: Study) -> dict[str, Any]:
    truth = [r["truth"][p.value]["accuracy"] for r in rows for p in PRECISIONS]
    methods = {}
    for m in METHODS:
        scores = [r["scores"][m.name][p.value]["score"] for r in rows for p in PRECISIONS]
        seconds = [r["scores"][m.name][p.value]["seconds"] for r in rows for p in PRECISIONS]
        methods[m.name] = {
            **spearman_with_interval(scores, truth),
            "seconds_per_candidate": float(np.median(seconds)),
            "method": dataclasses.asdict(m),
        }
    current = methods["ft30 (current)"]["seconds_per_candidate"]
    for record in methods.values():
        record["cost_vs_current"] = record["seconds_per_candidate"] / current
    result = {
        "data": "digits-hard",
        "model": study.info["arch"],
        "original_test_accuracy": study.info["test_accuracy"],
        "profile": study.profile.name,
        "policies": len(rows) * len(PRECISIONS),
        "recovery_finetune": dataclasses.asdict(study.recovery),
        "methods": methods,
        "rows": rows,
    }
    add_shortfall(result)
    return result


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Candidate scores against the shipped model: {result['policies']} policies on "
        f"{result['data']} ({result['model']}, original test accuracy "
        f"{result['original_test_accuracy']:.2%}).",
        "",
        "| score | Spearman rho [95%] | s per candidate | cost vs current | "
        "shortfall, mean / max (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in result["methods"].items():
        short = m.get("shortfall_points") or {}
        lines.append(
            f"| {name} | {m['rho']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}] | "
            f"{m['seconds_per_candidate']:.1f} | {m['cost_vs_current']:.2f}x | "
            f"{short.get('mean', float('nan')):+.2f} / {short.get('max', float('nan')):+.2f} |"
        )
    if result.get("costs"):
        lines += ["", f"Seconds per candidate: {result['costs']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    cols = 3
    fig, axes = plt.subplots(
        -(-len(names) // cols), cols, figsize=(12, 3.2 * -(-len(names) // cols))
    )
    for ax, name in zip(axes.flat, names, strict=False):
        for precision, marker in (("fp32", "o"), ("int8", "s")):
            xs = [r["scores"][name][precision]["score"] * 100 for r in result["rows"]]
            ys = [r["truth"][precision]["accuracy"] * 100 for r in result["rows"]]
            ax.scatter(xs, ys, marker=marker, s=18, label=precision)
        m = result["methods"][name]
        ax.set_title(f"{name}: rho {m['rho']:.2f}, {m['seconds_per_candidate']:.1f} s", fontsize=9)
        ax.set_xlabel("candidate score (val %)", fontsize=8)
        ax.set_ylabel("shipped test accuracy (%)", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def remeasure_costs(result: dict[str, Any], count: int, profile: str) -> None:
    """Time every method again on the first `count` channel policies, on a quiet machine.

    The study itself takes long enough that other work may share the machine; its rank
    correlations do not depend on that, its seconds do. This pass replaces them.
    """
    from pipeline.search.space import coupling_groups

    study = Study(profile)
    groups: dict[str, list[str]] = {}
    for layer, group in coupling_groups(study.original, DEMO_INPUT).items():
        groups.setdefault(group, []).append(layer)
    seconds: dict[str, list[float]] = {m.name: [] for m in METHODS}
    for _, ratios in channel_policies(study.original, groups, 10)[:count]:
        policy = to_policy(ratios, groups, Precision.FP32)
        for m in METHODS:
            scored = study.score(policy, m)
            seconds[m.name] += [scored[p.value]["seconds"] for p in PRECISIONS]
    current = float(np.median(seconds["ft30 (current)"]))
    for name, record in result["methods"].items():
        record["seconds_per_candidate"] = float(np.median(seconds[name]))
        record["cost_vs_current"] = record["seconds_per_candidate"] / current
    result["costs"] = (
        f"remeasured alone on the machine over {count} channel policies x 2 precisions"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", type=int, default=10, help="channel policies (x2 precisions)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/candidate_score"))
    parser.add_argument(
        "--costs-only",
        type=int,
        default=0,
        metavar="N",
        help="only time the methods again on N policies and update --out's JSON",
    )
    args = parser.parse_args()
    if args.costs_only:
        result = json.loads(args.out.with_suffix(".json").read_text())
        remeasure_costs(result, args.costs_only, args.profile)
        add_shortfall(result)
    else:
        result = run(args.policies, args.profile)
    write(result, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
