"""How a report.json document reads: report.md, pareto.png and the console table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.core.artifacts import atomic_write_with
from pipeline.core.stats import PairedDifference, difference_words, interval_text
from pipeline.run.fill_text import fill_markdown


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
    lines += _batches_markdown(summary)
    lines += _baselines_markdown(summary)
    lines += _search_markdown(summary)
    lines += _checks_markdown(summary)
    lines += _trtexec_markdown(summary)
    return "\n".join(lines) + "\n"


def _batches_markdown(summary: dict[str, Any]) -> list[str]:
    entries = summary.get("latency_by_batch") or []
    if not entries:
        return []
    lines = [
        "## Latency per batch (one interleaved session)",
        "",
        "| batch | original median ms | deployed median ms | deployed p90 ms | "
        "original images/s | deployed images/s | speedup |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        o, d = e["original"], e["deployed"]
        lines.append(
            f"| {e['batch']} | {o['median']:.3f} | {d['median']:.3f} | {d['p90']:.3f} | "
            f"{o['throughput_ips']:,.1f} | {d['throughput_ips']:,.1f} | {e['speedup']:.2f}x |"
        )
    return [*lines, ""]


def _baselines_markdown(summary: dict[str, Any]) -> list[str]:
    baselines = summary.get("baselines", {})
    if not baselines:
        return []
    lines = [
        "## Baselines (same runner, same run)",
        "",
        "Uniform pruning at the deployed model's latency (`uniform*`) and, when "
        "`search.matched_accuracy_steps` is set, in the search's precision at its test "
        "accuracy (`*_at_accuracy`; "
        "`*_at_floor` under the accuracy-floor objective: the least keep ratio holding the "
        "same floor by the deployed model's rule, on validation less the margin), each "
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
        if side.get("latency_matched") is False:  # baselines.MATCH_TOLERANCE
            label += ", latency not matched within 5%"
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
        *_objective_markdown(s),
        *_confirmation_markdown(s),
        *_search_precision_markdown(s),
    ]


def _objective_markdown(search: dict[str, Any]) -> list[str]:
    """Which objective the search ran, and how the pick held the floor once built in full."""
    floor = search.get("accuracy_floor")
    if floor is None:
        return ["Objective: the most accurate candidate under the budget.", ""]
    lines = [f"Objective: the fastest candidate holding {floor:.2%} validation accuracy."]
    probe = search.get("recovery_allowance")
    if probe:
        lines.append(
            f"- Candidates were judged on their short-fine-tune scores against "
            f"{search['score_floor']:.2%}: a uniform probe (keep {probe['probe_keep']:.2f}) "
            f"scored {probe['candidate_score']:.2%} after it and "
            f"{probe['full_recovery_score']:.2%} after the full recovery"
        )
    lines += [
        f"- Episode {t['episode']} built in full: {t['val_accuracy']:.2%} on validation"
        + (f", less a margin of {t['margin']:.2%} for the test set" if "margin" in t else "")
        + f": {'holds' if t['holds_floor'] else 'LOSES'} the floor"
        for t in search.get("floor_tries") or []
    ]
    return [*lines, *_descent_markdown(search.get("descent")), ""]


def _descent_markdown(descent: dict[str, Any] | None) -> list[str]:
    """The steps down from the held pick, and which model shipped."""
    if not descent:
        return []
    runs = descent.get("direction") or []
    lines = [
        f"- Descent direction: shrinking {d['layers'][0]} .. {d['layers'][-1]} alone by "
        f"x{d['factor']} saved {d['saving']:.1%} of the pick's latency; its keep ratios scale "
        f"by the step's factor to the power {d.get('weight', 1.0):.2f}"
        for d in runs
    ]
    rungs = ", ".join(
        f"x{r['scale']:.2f} {r['ratio']:.2f}{'' if r['kept'] else ' (skipped)'}"
        for r in descent.get("ladder") or []
    )
    if rungs:  # rungs not faster than every wider one were not tried
        lines.append(f"- Descent ladder (latency over the pick's, untrained): {rungs}")
    lines += [
        f"- Descent step {i}: keep ratios x{d['scale']:.3f}{' (weighted)' if runs else ''} "
        "built in full, "
        f"{d['val_accuracy']:.2%} on validation, less a "
        f"margin of {d['margin']:.2%} for the test set: "
        f"{'holds' if d['holds_floor'] else 'does not hold'} the floor"
        for i, d in enumerate(descent["steps"], 1)
    ]
    speedup = descent.get("speedup_over_pick")
    step = descent.get("shipped_step")
    which = f"descended model (step {step})" if step else f"{descent['shipped']} model"
    measured = f", {speedup:.2f}x the pick's speed" if speedup else ""
    return [*lines, f"- Shipped: the {which}{measured}"]


def _confirmation_markdown(search: dict[str, Any]) -> list[str]:
    """The pick's second measurement and any pick it turned down, or the floor's finalists."""
    tries = search.get("confirmation") or []
    lines = [
        f"- Episode {t['episode']} measured again: {t['confirmed_ms']:.3f} ms (search "
        f"{t['search_ms']:.3f} ms), {'meets' if t['meets_budget'] else 'MISSES'} the budget"
        for t in tries
    ]
    ranked = sorted(search.get("finalists") or [], key=lambda r: r["session_ms"])
    lines += [
        f"- Finalist episode {r['episode']}: {r['session_ms']:.3f} ms side by side "
        f"({r['ratio']:.3f}x the unpruned model; search {r['search_ms']:.3f} ms)"
        for r in ranked
    ]
    lines += fill_markdown(search.get("fill"))
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


def _checks_markdown(summary: dict[str, Any]) -> list[str]:
    v = summary["validation"]
    # No error figure when the outputs hold NaN or inf: the comparator leaves it None
    error = "n/a" if v["max_abs_error"] is None else f"{v['max_abs_error']:.4g}"
    lines = [
        "## Checks",
        "",
        f"- Validation: {'passed' if v['passed'] else 'FAILED'} (top-1 agreement "
        f"{v['top1_agreement']:.2%}, max abs logit error {error}, "
        f"NaN/inf: {'yes' if v['nan_or_inf'] else 'no'})",
    ]
    if summary["budget_ms"] is not None:
        gate, budget = summary.get("budget_ms_at_gate"), summary["budget_ms"]
        drift = "" if gate in (None, budget) else f" ({gate:.4g} ms at the gate)"
        lines.append(f"- Budget {budget} ms{drift}: {'met' if summary['met_budget'] else 'MISSED'}")
    lines += _floor_markdown(summary)
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


def _trtexec_markdown(summary: dict[str, Any]) -> list[str]:
    """For TensorRT targets: build and time the engine by hand, in the run directory."""
    commands = summary.get("trtexec")
    if not commands:
        return []
    return [
        "## Build and time it with trtexec",
        "",
        "In this run directory on the device, the same build as this tool's (strongly typed, "
        "TF32 off, same workspace, timing cache and shapes), then its latency:",
        "",
        "```",
        commands["build"],
        commands["bench"],
        "```",
        "",
    ]


def _floor_markdown(summary: dict[str, Any]) -> list[str]:
    """The test accuracy drop, with its interval, against the drop the run allows."""
    allowed = summary.get("max_accuracy_drop")
    if allowed is None:
        return []
    drop = summary["accuracy_drop"]
    ci = interval_text(summary.get("accuracy_drop_ci95"))
    held = "held" if drop <= allowed else "EXCEEDED"
    return [
        f"- Accuracy drop {drop * 100:.2f} points{' ' + ci if ci else ''} on test, "
        f"{allowed * 100:.2f} allowed: {held}"
    ]


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
