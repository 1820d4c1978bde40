"""Re-measure a run's original.onnx and model.onnx with plain ONNX Runtime, outside the tool.

An independent check of a run's report: it uses only onnxruntime and numpy (nothing from the
`pipeline` package), the thread count recorded in the run's manifest, 20 warm-up runs and 200
timed runs per model, and compares the medians with report.json.

    python benchmarks/independent_latency.py RUN_DIR [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def median_ms(path: Path, shape: list[int], threads: int, runs: int = 200) -> dict[str, float]:
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    feed = {name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    for _ in range(20):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": float(np.median(times)), "p90": float(np.percentile(times, 90)), "runs": runs}


def check(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    prof = manifest["profile"]
    shape = [prof["input"]["batch"], *prof["input"]["shape"]]
    result: dict = {"run_dir": str(run_dir), "threads": prof["threads"]}
    for key, name in (("original", "original.onnx"), ("deployed", "model.onnx")):
        measured = median_ms(run_dir / name, shape, prof["threads"])
        reported = report[key]["latency_ms"]["median"]
        result[key] = {
            "independent_ms": measured,
            "report_ms": reported,
            "report_vs_independent": reported / measured["median"],
        }
    result["independent_speedup"] = (
        result["original"]["independent_ms"]["median"]
        / result["deployed"]["independent_ms"]["median"]
    )
    result["report_speedup"] = report["speedup"]
    result["report_accuracy_drop"] = report["accuracy_drop"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [check(d) for d in args.run_dirs]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
