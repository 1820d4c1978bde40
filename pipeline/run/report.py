"""report.json, report.md, pareto.png and manifest.json of a run."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.core.artifacts import (
    atomic_write_text,
    atomic_write_with,
    sha256_file,
    versions,
    write_json,
)
from pipeline.core.stats import (
    PairedDifference,
    accuracy_interval,
    difference_words,
    interval_text,
    paired_difference,
    ratio_interval,
)
from pipeline.run.context import RunContext, console

LATENCY_KEYS = ("median", "p90", "cv")
DRIFT = 1.05  # the original measuring this much slower at the end than at the search's start


def write_manifest(ctx: RunContext, status: str) -> None:
    """What produced this run: versions, resolved profile and config, seeds, splits, hashes."""
    files = {
        p.name: sha256_file(p)
        for p in sorted(ctx.run_dir.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json"
    }
    manifest = {
        "status": status,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ctx.started)),
        "versions": versions(),
        "platform": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "system": platform.platform(),
        },
        "profile": ctx.profile.model_dump(mode="json"),
        "config": ctx.config.model_dump(mode="json"),
        "seed": ctx.config.seed,
        "model": ctx.model_info,
        "data": ctx.splits.record if ctx.splits is not None else None,
        "files": files,
    }
    write_json(ctx.run_dir / "manifest.json", manifest)


def _side(ctx: RunContext, key: str) -> dict[str, Any]:
    r = ctx.results.get(key, {})
    static = ctx.results.get("deployed_static", {}) if key == "deployed" else {}
    lat = r.get("latency_ms", {})
    return {
        "accuracy": r.get("accuracy"),
        "latency_ms": {k: lat.get(k) for k in LATENCY_KEYS},
        "params": r.get("params", static.get("params")),
        "macs": r.get("macs", static.get("macs")),
        "size_bytes": r.get("size_bytes", static.get("size_bytes")),
        "rounds_ms": r.get("rounds_ms"),
    }


def _drift(ctx: RunContext) -> str:
    """Why a budget met during the search can be missed at the end: the machine got slower.

    The original is measured both when the search starts and in the final comparison; when it
    too measures clearly slower at the end, the miss says so.
    """
    before = ctx.results.get("search_original_ms")
    after = ctx.results.get("original", {}).get("latency_ms", {}).get(ctx.profile.measure.statistic)
    if not before or not after or after < DRIFT * before:
        return ""
    return (
        f" (the original also measured {after / before:.2f}x slower than when the search began:"
        " the target was slower during the final measurement; re-measure with `pipeline bench`)"
    )


def _gates(ctx: RunContext, summary: dict[str, Any]) -> dict[str, Any]:
    """Every check a deployable run must pass, with the reasons of those that failed."""
    failed = []
    if not summary["validation"]["passed"]:
        failed.append(
            "validation against the original failed: "
            + "; ".join(summary["validation"].get("reasons", []))
        )
    if summary["met_budget"] is False:
        failed.append(f"deployed latency misses the {summary['budget_ms']} ms budget" + _drift(ctx))
    if summary["accuracy_drop"] > ctx.profile.max_accuracy_drop:
        failed.append(
            f"accuracy drop {summary['accuracy_drop']:.4f} exceeds the profile's "
            f"max_accuracy_drop {ctx.profile.max_accuracy_drop}"
        )
    check = ctx.results.get("precision_check")
    if check and not check["not_slower"] and check["shipped"] != "fp32":
        failed.append(
            f"the policy's precisions run slower than FP32 on this target "
            f"({check['speedup']:.2f}x); try another int8 scheme or FP32"
        )
    mismatched = ctx.results.get("precision", {}).get("mismatched_layers")
    if mismatched:
        failed.append(
            f"{len(mismatched)} layers do not run in the policy's precision: "
            + ", ".join(mismatched[:5])
        )
    return {"passed": not failed, "failed": failed}


def build_summary(ctx: RunContext, comparison: dict[str, Any]) -> dict[str, Any]:
    """The report.json document (keys are a stable contract)."""
    original, deployed = _side(ctx, "original"), _side(ctx, "deployed")
    stat = ctx.profile.measure.statistic
    o_ms, d_ms = ctx.results["original"]["latency_ms"], ctx.results["deployed"]["latency_ms"]
    budget = ctx.results.get("budget_ms") or ctx.config.budget_ms or ctx.profile.budget_ms
    summary: dict[str, Any] = {
        "profile": ctx.profile.name,
        "runtime": ctx.profile.runtime,
        "statistic": stat,
        "original": original,
        "deployed": deployed,
        "speedup": o_ms["median"] / d_ms["median"],
        "accuracy_drop": original["accuracy"] - deployed["accuracy"],
        "budget_ms": budget,
        "met_budget": None if budget is None else d_ms[stat] <= budget,
        "validation": comparison,
        "search": ctx.results.get("search") or _fixed_search(ctx),
        "baselines": ctx.results.get("baselines", {}),
        "precision_check": ctx.results.get("precision_check"),
        "engine": ctx.results.get("engine"),
        "precision": ctx.results.get("precision"),
        "floor": {k: ctx.results[k].get("floor") for k in ("original", "deployed")},
        "noisy_measurements": [k for k in ("original", "deployed") if ctx.results[k].get("noisy")],
    }
    _add_intervals(ctx, summary)
    summary["gates"] = _gates(ctx, summary)
    return summary


def _add_intervals(ctx: RunContext, summary: dict[str, Any]) -> None:
    """95% intervals on every accuracy and paired difference the report states, computed on
    the same test images, and on the speedup from the interleaved rounds (`pipeline.core.stats`)."""
    correct = ctx.results.get("test_correct") or {}
    if "original" not in correct or "deployed" not in correct:
        return
    n = len(correct["original"])
    summary["test_images"] = n
    for key in ("original", "deployed"):
        summary[key]["accuracy_ci95"] = _accuracy_ci(correct[key])
    drop = paired_difference(correct["original"], correct["deployed"])
    summary["accuracy_drop_ci95"] = [drop.low, drop.high]
    summary["accuracy_drop_within_noise"] = drop.within_noise
    speedup = ratio_interval(summary["original"]["rounds_ms"], summary["deployed"]["rounds_ms"])
    summary["speedup_ci95"] = speedup.as_list() if speedup else None
    for name, side in summary["baselines"].items():
        if name in correct:
            side["accuracy_ci95"] = _accuracy_ci(correct[name])
            side["vs_deployed"] = paired_difference(correct["deployed"], correct[name]).as_dict()


def _accuracy_ci(correct: Any) -> list[float]:
    return accuracy_interval(int(correct.sum()), len(correct)).as_list()


def _fixed_search(ctx: RunContext) -> dict[str, Any]:
    """The `search` record of a run given a fixed policy (no search)."""
    return {
        "agent": "fixed",
        "policy": ctx.config.policy,
        "episodes": 0,
        "real_measurements": 0,
        "cached_measurements": 0,
        "predicted_measurements": 0,
        "wall_s": 0.0,
    }


def write_report(ctx: RunContext, comparison: dict[str, Any]) -> dict[str, Any]:
    summary = build_summary(ctx, comparison)
    summary["wall_s"] = round(time.time() - ctx.started, 1)
    write_pareto(ctx.run_dir / "pareto.png", summary, ctx.results.get("candidates"))
    write_json(ctx.run_dir / "report.json", summary)
    atomic_write_text(ctx.run_dir / "report.md", render_markdown(summary))
    return summary


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    o, d = summary["original"], summary["deployed"]
    return [
        ("test accuracy", _accuracy_cell(o), _accuracy_cell(d)),
        (
            "latency median (ms)",
            _fmt(o["latency_ms"]["median"], ".3f"),
            _fmt(d["latency_ms"]["median"], ".3f"),
        ),
        (
            "latency p90 (ms)",
            _fmt(o["latency_ms"]["p90"], ".3f"),
            _fmt(d["latency_ms"]["p90"], ".3f"),
        ),
        ("latency CV", _fmt(o["latency_ms"]["cv"], ".3f"), _fmt(d["latency_ms"]["cv"], ".3f")),
        ("params", _fmt(o["params"], ","), _fmt(d["params"], ",")),
        ("MACs", _fmt(o["macs"], ","), _fmt(d["macs"], ",")),
        ("size (bytes)", _fmt(o["size_bytes"], ","), _fmt(d["size_bytes"], ",")),
    ]


def _accuracy_cell(side: dict[str, Any]) -> str:
    """'97.12% [96.80, 97.43]': the accuracy and its 95% interval in points."""
    text = _fmt(side["accuracy"], ".2%")
    ci = interval_text(side.get("accuracy_ci95"))
    return f"{text} {ci}" if ci else text


def headline(summary: dict[str, Any]) -> str:
    """Speedup and accuracy drop with their 95% intervals, in words."""
    speedup = f"Speedup {summary['speedup']:.2f}x"
    if summary.get("speedup_ci95"):
        speedup += f" {interval_text(summary['speedup_ci95'], 1.0)}"
    drop = f"accuracy drop {summary['accuracy_drop'] * 100:.2f} points"
    if summary.get("accuracy_drop_ci95"):
        drop += f" {interval_text(summary['accuracy_drop_ci95'])}"
        if summary.get("accuracy_drop_within_noise"):
            drop += ", within noise"
    n = summary.get("test_images")
    images = f" on {n:,} test images" if n else ""
    return f"{speedup} (median latency, same runner), {drop}{images} (95% intervals)."


def render_markdown(summary: dict[str, Any]) -> str:
    """A report a person can read: verdict, original vs deployed table, checks."""
    verdict = "deployable" if summary["gates"]["passed"] else "NOT deployable"
    lines = [
        f"# Run report: {summary['profile']} ({summary['runtime']})",
        "",
        f"**Verdict: {verdict}.** {headline(summary)}",
        "",
        "| | original | deployed |",
        "|---|---:|---:|",
        *[f"| {name} | {a} | {b} |" for name, a, b in _rows(summary)],
        "",
    ]
    lines += _baselines_markdown(summary)
    lines += _search_markdown(summary)
    lines += _checks_markdown(summary)
    return "\n".join(lines) + "\n"


def _baselines_markdown(summary: dict[str, Any]) -> list[str]:
    baselines = summary.get("baselines", {})
    if not baselines:
        return []
    lines = [
        "## Baselines (same runner, same run)",
        "",
        "Uniform pruning at the deployed model's latency (`uniform*`) and, when "
        "`search.matched_accuracy_steps` is set, at its test accuracy (`*_at_accuracy`), each "
        "fully fine-tuned like it. The last column comes from one session measuring every "
        "baseline with the deployed model.",
        "",
        "| model | test accuracy [95%] | median ms | p90 ms | speedup vs original | params | "
        "deployed is faster | deployed minus model, test accuracy [95%] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    original_ms = summary["original"]["latency_ms"]["median"]
    for name, side in [("deployed", summary["deployed"]), *baselines.items()]:
        lat = side["latency_ms"]
        label = f"{name} (keep {side['keep_ratio']:.3f})" if "keep_ratio" in side else name
        if side.get("reached") is False:
            label += ", less accurate even unpruned"
        ratio = side.get("deployed_speedup")
        vs = side.get("vs_deployed")
        versus = difference_words(PairedDifference(**_paired_fields(vs))) if vs else ""
        lines.append(
            f"| {label} | {_accuracy_cell(side)} | {lat['median']:.3f} | "
            f"{lat['p90']:.3f} | {original_ms / lat['median']:.2f}x | {side['params']:,} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | {versus} |"
        )
    return [*lines, ""]


def _paired_fields(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("difference", "low", "high", "n", "a_only", "b_only")
    return {k: record[k] for k in keys}


def _model_error(search: dict[str, Any]) -> str:
    model = search.get("latency_model") or {}
    if model.get("median_abs_error") is None:
        return ""
    return (
        f" (latency model: median error {model['median_abs_error']:.1%} over "
        f"{model['checked']} checks)"
    )


def _search_markdown(summary: dict[str, Any]) -> list[str]:
    s = summary["search"]
    if s.get("agent") == "fixed":
        return [f"Fixed policy `{s.get('policy')}` (no search).", ""]
    return [
        "## Search",
        "",
        f"Agent `{s['agent']}`: {s['episodes']} candidates, {s['real_measurements']} measured "
        f"on the target, {s['cached_measurements']} from the cache, "
        f"{s.get('predicted_measurements', 0)} predicted{_model_error(s)}, "
        f"{s.get('failed_candidates', 0)} failed; best at episode {s.get('best_episode')}; "
        f"{s['wall_s']:.0f} s. Shipped: {s.get('shipped')}.",
        "",
        *_confirmation_markdown(s),
        *_search_precision_markdown(s),
    ]


def _confirmation_markdown(search: dict[str, Any]) -> list[str]:
    """The pick's second measurement, and any pick it turned down."""
    tries = search.get("confirmation") or []
    lines = [
        f"- Episode {t['episode']} measured again: {t['confirmed_ms']:.3f} ms (search "
        f"{t['search_ms']:.3f} ms), {'meets' if t['meets_budget'] else 'MISSES'} the budget"
        for t in tries
    ]
    return [*lines, ""] if lines else []


def _search_precision_markdown(search: dict[str, Any]) -> list[str]:
    """Which precision the channel search ran in, and the measurements that decided it."""
    measured = search.get("precision_latency_ms")
    if not measured:
        return []
    times = ", ".join(f"{p} {ms:.3f} ms" for p, ms in measured.items())
    return [
        f"The original with every layer in one precision measured {times}; channel searches "
        f"ran in {search.get('search_precision')}.",
        "",
    ]


def write_no_candidate(ctx: RunContext) -> None:
    """When no candidate meets the budget: say so plainly; nothing is shipped."""
    search = ctx.results.get("search", {})
    closest = min((c["latency_ms"] for c in ctx.results.get("candidates", [])), default=None)
    message = (
        f"no candidate met the {ctx.results.get('budget_ms'):.3f} ms budget in "
        f"{search.get('episodes')} episodes (fastest: "
        f"{'-' if closest is None else f'{closest:.3f} ms'}); nothing was shipped. "
        "Raise the budget, run more episodes, or pass --allow-over-budget to ship the "
        "closest candidate"
    )
    write_json(
        ctx.run_dir / "report.json",
        {
            "profile": ctx.profile.name,
            "budget_ms": ctx.results.get("budget_ms"),
            "met_budget": False,
            "search": search,
            "message": message,
            "gates": {"passed": False, "failed": [message]},
        },
    )
    atomic_write_text(
        ctx.run_dir / "report.md",
        f"# Run report: {ctx.profile.name}\n\n**Verdict: NOT deployable.** {message}.\n",
    )
    console.print(f"[red]{message}[/]")


def _checks_markdown(summary: dict[str, Any]) -> list[str]:
    v = summary["validation"]
    lines = [
        "## Checks",
        "",
        f"- Validation: {'passed' if v['passed'] else 'FAILED'} (top-1 agreement "
        f"{v['top1_agreement']:.2%}, max abs logit error {v['max_abs_error']:.4g}, "
        f"NaN/inf: {'yes' if v['nan_or_inf'] else 'no'})",
    ]
    if summary["budget_ms"] is not None:
        lines.append(
            f"- Budget {summary['budget_ms']} ms: {'met' if summary['met_budget'] else 'MISSED'}"
        )
    check = summary.get("precision_check")
    if check:
        word = "faster" if check["not_slower"] else "SLOWER"
        shipped = "; shipped in FP32" if check["shipped"] == "fp32" else ""
        lines.append(
            f"- Policy precisions vs the same pruned model in FP32: {check['speedup']:.2f}x "
            f"({word}{shipped})"
        )
    lines += _precision_markdown(summary.get("precision") or {})
    for key in summary.get("noisy_measurements", []):
        lines.append(f"- The {key} latency measurement was noisy (CV above the profile's max_cv)")
    lines += [f"- Gate failed: {reason}" for reason in summary["gates"]["failed"]]
    return [*lines, ""]


def _precision_markdown(precision: dict[str, Any]) -> list[str]:
    """How INT8 was recovered (PTQ or QAT) and which FP16-layer ops stayed in FP32."""
    lines = []
    rec = precision.get("int8_recovery") or {}
    if rec.get("method") in ("ptq", "qat"):
        qat = rec.get("qat_accuracy")
        tried = f", after QAT {qat:.2%}" if qat is not None else ""
        lines.append(
            f"- INT8: {rec['method'].upper()} shipped (val accuracy float "
            f"{rec['float_accuracy']:.2%}, after calibration {rec['ptq_accuracy']:.2%}{tried})"
        )
    kept = (precision.get("quantization") or {}).get("kept_fp32_nodes") or []
    if kept:
        lines.append(f"- Kept in FP32 inside FP16 layers (overflow-prone): {', '.join(kept)}")
    return lines


def write_pareto(path: Path, summary: dict[str, Any], candidates: list[dict] | None = None) -> None:
    """Latency vs accuracy of every candidate and baseline, original and deployed marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if candidates:
        ax.scatter(
            [c["latency_ms"] for c in candidates],
            [c["accuracy"] * 100 for c in candidates],
            s=12,
            c="tab:gray",
            alpha=0.6,
            label="candidates (val, short fine-tune)",
        )
    sides = [(name, side, "s", 6) for name, side in summary.get("baselines", {}).items()]
    sides += [
        ("original", summary["original"], "o", 10),
        ("deployed", summary["deployed"], "*", 14),
    ]
    for name, side, marker, size in sides:
        _point(ax, side, marker, size, name)
    if summary.get("budget_ms"):
        ax.axvline(summary["budget_ms"], ls="--", c="tab:red", label="budget")
    ax.set_xlabel(f"median latency (ms), {summary['runtime']}")
    ax.set_ylabel("test accuracy (%), 95% interval")
    ax.set_title(f"{summary['profile']}: latency vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _point(ax: Any, side: dict[str, Any], marker: str, size: float, label: str) -> None:
    """One model at (median latency, test accuracy), with its 95% interval as an error bar."""
    acc, ci = side["accuracy"] * 100, side.get("accuracy_ci95")
    yerr = [[acc - ci[0] * 100], [ci[1] * 100 - acc]] if ci else None
    ax.errorbar(
        side["latency_ms"]["median"], acc, yerr=yerr, fmt=marker, ms=size, capsize=3, label=label
    )


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['profile']}: original vs deployed")
    for col in ("", "original", "deployed"):
        table.add_column(col, justify="right" if col else "left")
    for row in _rows(summary):
        table.add_row(*row)
    console.print(table)
    console.print(
        f"{headline(summary)} Validation "
        f"{'passed' if summary['validation']['passed'] else '[red]FAILED[/]'}."
    )
    for reason in summary["gates"]["failed"]:
        console.print(f"[red]gate failed:[/] {reason}")
