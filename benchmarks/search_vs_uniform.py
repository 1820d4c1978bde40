"""The demo's search against uniform pruning at matched latency and at matched accuracy, over
several seeds.

Runs `pipeline run --target profiles/cpu.yaml` (default agent, budget 0.3 x the original's
measured latency) once per seed, then re-measures every run's original and deployed model with
plain ONNX Runtime (benchmarks/independent_latency.py), and writes one JSON summary.

    python benchmarks/search_vs_uniform.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from independent_latency import check

ROOT = Path(__file__).resolve().parents[1]
MATCHED_ACCURACY_STEPS = 4


def one_run(seed: int, out: Path, extra: list[str]) -> dict:
    start = time.time()
    config = out / "config.yaml"  # the uniform baselines at the deployed model's accuracy, too
    config.write_text(f"search: {{matched_accuracy_steps: {MATCHED_ACCURACY_STEPS}}}\n")
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        "--target",
        str(ROOT / "profiles/cpu.yaml"),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--no-progress",
        "--config",
        str(config),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    if not (run_dir / "report.json").is_file():
        raise RuntimeError(f"seed {seed}: the run wrote no report: {proc.stderr.strip()[-2000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    deployed = report["deployed"]
    # every ratio comes from the run's one session measuring the baselines with the deployed model
    versus = {
        name: {
            "accuracy_gain_points": 100 * (deployed["accuracy"] - side["accuracy"]),
            "deployed_speedup": side["deployed_speedup"],
            "keep_ratio": side.get("keep_ratio"),
            "reached": side.get("reached"),
        }
        for name, side in report["baselines"].items()
    }
    return {
        "seed": seed,
        "exit_code": proc.returncode,
        "wall_s": round(time.time() - start, 1),
        "budget_ms": report["budget_ms"],
        "met_budget": report["met_budget"],
        "episodes": report["search"]["episodes"],
        "deployed": deployed,
        "search_precision": report["search"].get("search_precision"),
        "precision_latency_ms": report["search"].get("precision_latency_ms"),
        "baselines": report["baselines"],
        "versus": versus,
        "independent": check(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/search_vs_uniform.json"
    )
    parser.add_argument("extra", nargs="*", help="more `pipeline run` flags, after --")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(one_run(seed, Path(tmp), args.extra))
        summary = {k: rows[-1][k] for k in ("seed", "met_budget", "wall_s")}
        print(json.dumps({**summary, "versus": rows[-1]["versus"]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
