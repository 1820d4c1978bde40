"""Architecture coverage: every torchvision classifier through `pipeline run --policy uniform:0.3`.

Each architecture is built untrained (`--random-init`), pruned to a uniform keep ratio of 0.3,
given one recovery fine-tune step, exported and validated, on a small generated image folder
(10 classes x 8 noise images) and a copy of the CPU profile with the fewest timed runs it
allows. Each run is a subprocess with a timeout; per architecture the JSON keeps:

- `outcome`: `ok` (pruned, exported, and the deployed ONNX agrees with the pruned model in
  `validation.json`), `refused` (exit 2 and its one line), `failed` (exit 1 without a validated
  model, with its reasons), `internal error` (exit 1 with a traceback or 'internal error'),
  `timeout`;
- `gates`: the run's own gates, apart from the outcome (an untrained original scores at chance,
  which fails the accuracy gate whatever pruning does);
- params and MACs before and after, wall time, and the run's peak memory (max RSS).

The input is 3x64x64 unless the model refuses it; then 3x224x224 (ViT, Swin and MaxViT need
exactly 224). Architectures run smallest first; the JSON is rewritten after each, and a rerun
skips those already in it, so a long sweep can be stopped and resumed.

    python benchmarks/architectures.py [--models densenet121 googlenet] [--timeout-s 1200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SMALL, FULL = "3x64x64", "3x224x224"
NEEDS_224 = ("vit_", "swin_", "maxvit_")  # fixed patch grids / window sizes
POLICY = "uniform:0.3"
OUTCOMES = ("ok", "refused", "failed", "internal error", "timeout")
# Refusals that mean "64x64 is too small for this model": tried again at 224x224 (AlexNet's
# adaptive pooling, for one, has no ONNX form unless its output divides the input)
TOO_SMALL = ("rejects input shape", "does the model accept this input")


def classifiers() -> list[str]:
    """Every torchvision classification architecture, smallest (by parameters) first."""
    import torchvision
    from torchvision.models import get_model_weights

    def size(name: str) -> int:
        return min(w.meta["num_params"] for w in get_model_weights(name))

    return sorted(torchvision.models.list_models(module=torchvision.models), key=size)


def write_images(folder: Path, classes: int = 10, per_class: int = 8, seed: int = 0) -> Path:
    """A tiny image folder of noise PNGs: enough to split, train one step and validate."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i}.png")
    return folder


def cheap_profile(path: Path) -> Path:
    """profiles/cpu.yaml with the fewest warm-up and timed runs, one round, a small calibration."""
    profile = yaml.safe_load((ROOT / "profiles" / "cpu.yaml").read_text())
    profile["name"] = "cpu-coverage"
    profile["measure"].update(warmup=1, repeats=30, rounds=1)
    profile["int8"]["calib_samples"] = 8
    path.write_text(yaml.safe_dump(profile))
    return path


def run_config(path: Path) -> Path:
    """A run config that gives each latency measurement 10 minutes: on a busy machine the
    default 2 minutes can run out for a large model."""
    path.write_text(yaml.safe_dump({"search": {"timeout_s": 600}}))
    return path


def run_once(cmd: list[str], log: Path, timeout_s: float) -> tuple[int | None, float, int]:
    """Run `cmd` with its output in `log`; (exit code or None on timeout, wall s, max RSS kB)."""
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        os.killpg(proc.pid, signal.SIGKILL)  # the run and any measuring child it started

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this run's own rusage, its children included
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    return (None if timed_out.is_set() else proc.returncode), wall, int(usage.ru_maxrss)


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def read_run(out: Path) -> dict[str, Any] | None:
    """The figures of the run directory under `out`, or None when the run wrote no report."""
    runs = [d for d in out.iterdir() if (d / "report.json").is_file()]
    if not runs:
        return None
    report = json.loads((runs[0] / "report.json").read_text())
    validation_file = runs[0] / "validation.json"
    validation = json.loads(validation_file.read_text()) if validation_file.is_file() else {}
    fidelity = validation.get("fidelity", {})
    original, deployed = report["original"], report["deployed"]
    return {
        "params": [original["params"], deployed["params"]],
        "macs": [original["macs"], deployed["macs"]],
        "pruned": deployed["params"] < original["params"],
        "exported": (runs[0] / "model.onnx").is_file(),
        "validated": bool(fidelity.get("passed")),
        "validation_reasons": fidelity.get("reasons", []),
        "gates": report.get("gates", {}),
    }


def classify(code: int | None, log: Path, figures: dict[str, Any] | None) -> tuple[str, str]:
    """The outcome of one run and the line that explains it."""
    text = log.read_text(errors="replace")
    if code is None:
        return "timeout", ""
    if code < 0:  # no exit of its own: the kernel's out-of-memory killer, most often
        name = signal.Signals(-code).name
        return "failed", f"killed by {name} (out of memory?) during: {last_line(log)}"
    if "internal error" in text or "Traceback (most recent call last)" in text:
        return "internal error", last_line(log)
    if code == 2:
        return "refused", last_line(log)
    if figures and figures["pruned"] and figures["exported"] and figures["validated"]:
        return "ok", ""
    if figures is None:
        return "failed", last_line(log)
    why = [k for k in ("pruned", "exported", "validated") if not figures[k]]
    return "failed", "not " + ", not ".join(why) + "; " + "; ".join(figures["validation_reasons"])


def run_model(name: str, work: Path, profile: Path, data: Path, args: Any) -> dict[str, Any]:
    """One architecture: at 3x64x64, or at 3x224x224 when it needs or asks for it."""
    shapes = [FULL] if name.startswith(NEEDS_224) else [SMALL, FULL]
    entry: dict[str, Any] = {}
    for shape in shapes:
        out = work / f"{name}-{shape}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [
            str(ROOT / ".venv" / "bin" / "pipeline"), "run", "--target", str(profile),
            "--config", str(profile.with_name("run.yaml")),
            "--model", name, "--random-init", "--policy", POLICY, "--data", f"imagefolder:{data}",
            "--input-shape", shape, "--finetune-steps", "1", "--out", str(out), "--no-progress",
        ]  # fmt: skip
        log = out / "log.txt"
        code, wall, rss_kb = run_once(cmd, log, args.timeout_s)
        figures = read_run(out)
        outcome, line = classify(code, log, figures)
        entry = {
            "model": name,
            "input_shape": shape,
            "outcome": outcome,
            "exit_code": code,
            "reason": line,
            "wall_s": round(wall, 1),
            "peak_rss_mb": round(rss_kb / 1024),
            **(figures or {}),
        }
        shutil.rmtree(out, ignore_errors=True)  # ONNX files of the large models fill a disk
        if not (outcome == "refused" and any(why in line for why in TOO_SMALL)):
            break
    return entry


def gates(entry: dict[str, Any]) -> str:
    """The run's own gates in a few words ('-' when it wrote no report)."""
    if "gates" not in entry:
        return "-"
    failed = entry["gates"].get("failed", [])
    if not failed:
        return "passed"
    chance = [f for f in failed if "chance level" in f]
    others = len(failed) - len(chance)
    return "failed: " + ", ".join(
        (["original at chance"] if chance else []) + ([f"{others} more"] if others else [])
    )


def markdown(results: dict[str, dict[str, Any]], order: list[str]) -> str:
    """The coverage table and the rate, architectures in the sweep's order."""
    done = [results[m] for m in order if m in results]
    ok = sum(r["outcome"] == "ok" for r in done)
    lines = [
        f"**{ok} of {len(done)} architectures pruned, exported and validated "
        f"({100 * ok / max(len(done), 1):.0f}%)**; {len(order) - len(done)} not run.",
        "",
        "| architecture | input | result | params kept | MACs kept | run's gates | wall (s) "
        "| peak RSS (MB) |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for r in done:
        result = r["outcome"] + (f": {r['reason']}" if r["reason"] else "")
        kept = {k: f"{r[k][1] / r[k][0]:.0%}" if k in r else "-" for k in ("params", "macs")}
        lines.append(
            f"| {r['model']} | {r['input_shape'][2:]} | {result.replace('|', '/')} | "
            f"{kept['params']} | {kept['macs']} | {gates(r)} | {r['wall_s']:.0f} | "
            f"{r['peak_rss_mb']} |"
        )
    return "\n".join(lines) + "\n"


def save(results: dict[str, dict[str, Any]], order: list[str], path: Path) -> None:
    path.write_text(json.dumps({"policy": POLICY, "results": results}, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(results, order))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="architectures (default: every classifier)")
    parser.add_argument("--timeout-s", type=float, default=1200, help="per architecture")
    parser.add_argument("--out", type=Path, default=RESULTS / "architectures.json")
    parser.add_argument("--rerun", action="store_true", help="run again those already in --out")
    parser.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    args = parser.parse_args()
    order = classifiers()
    models = [] if args.table else args.models or order
    path = args.out
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    if args.table:
        save(results, order, path)
    with tempfile.TemporaryDirectory(prefix="architectures-") as tmp:
        work = Path(tmp)
        data = write_images(work / "images")
        profile = cheap_profile(work / "cpu-coverage.yaml")
        run_config(work / "run.yaml")
        for name in models:
            if name in results and not args.rerun:
                continue
            entry = run_model(name, work, profile, data, args)
            results[name] = entry
            save(results, order, path)
            print(f"{name}: {entry['outcome']} {entry['reason']} ({entry['wall_s']} s)", flush=True)
    ok = sum(r["outcome"] == "ok" for r in results.values())
    print(f"{ok} / {len(results)} ok", file=sys.stderr)


if __name__ == "__main__":
    main()
