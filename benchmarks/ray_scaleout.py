"""Search wall time on a Ray cluster with 1 and 2 workers, measuring on two device agents.

Two real device agents run on 127.0.0.1 (`pipeline device serve`); the profile lists both
(`devices:`). The same random search (same seed, so the same candidates) runs with
`search.parallel: {backend: ray, workers: 1}`, then with 2 workers, then on the local backend
for reference. Candidates are small and barely fine-tuned while each measurement takes thousands
of timed runs, so a candidate's cost is mostly waiting on a device: what more workers (and more
devices) buy back. Ray workers start, and the devices start their measuring processes, before
the clock starts; the search's wall time is what is compared.

    python benchmarks/ray_scaleout.py [--episodes 10] [--repeats 4000]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the device agent helper the tests use
TOKEN_ENV = "PIPELINE_BENCH_DEVICE_TOKEN"
INPUT = (3, 32, 32)


def tiny_resnet():
    """ResNet-10 (one BasicBlock per stage) for 10 classes, seeded."""
    import torch
    from torchvision.models.resnet import BasicBlock, ResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()


def fleet_profile(urls: list[str], repeats: int):
    from pipeline.core.profile import TargetProfile

    device = {"token_env": TOKEN_ENV, "timeout_s": 300, "retries": 2}
    return TargetProfile.model_validate(
        {
            "name": "bench-fleet",
            "description": "two identical CPU devices behind agents on 127.0.0.1",
            "runtime": "onnxruntime-cpu",
            "devices": [{"url": url, **device} for url in urls],
            "precisions": ["fp32"],
            "input": {"shape": list(INPUT), "batch": 1},
            "threads": 1,
            "measure": {"warmup": 20, "repeats": repeats},
        }
    )


def evaluator(profile, work: Path, steps: int):
    """A fresh evaluator (empty cache) around the original, measured on the first device."""
    from exporters import export_onnx
    from pipeline.core.train_spec import TrainSpec
    from pipeline.model.data import load_data
    from pipeline.search.build import build_evaluator
    from pipeline.search.measurements import MeasurementCache

    model = tiny_resnet()
    splits = load_data("digits", INPUT, seed=0)
    work.mkdir(parents=True, exist_ok=True)
    original = export_onnx(model, INPUT, work / "original.onnx")
    spec = TrainSpec(steps=steps, lr=0.01, batch_size=32, kd_weight=1.0)
    # Every candidate is measured: a latency model standing in for some would make the two
    # worker counts measure different numbers of candidates.
    extra = {"latency_model": False}
    if "latency_model" not in inspect.signature(build_evaluator).parameters:
        extra = {}
    cache = MeasurementCache(work / "measurements.jsonl")
    return build_evaluator(model, splits, profile, original, spec, None, cache, **extra)


def one_search(profile, backend: str, workers: int, args, work: Path) -> dict[str, Any]:
    from pipeline.search import run_search
    from pipeline.search.parallel import ParallelConfig, describe, parallel_evaluator

    base = evaluator(profile, work, args.candidate_steps)
    started = time.time()
    search_evaluator = parallel_evaluator(base, ParallelConfig(backend=backend, workers=workers))
    setup_s = time.time() - started
    try:
        outcome = run_search(
            search_evaluator,
            agent_name="random",
            reward_name="budget",
            episodes=args.episodes,
            run_dir=work,
            seed=0,
            show_progress=False,
        )
        parallel = describe(search_evaluator)
    finally:
        search_evaluator.close()
    policies = json.dumps([r["policy"] for r in outcome.records], sort_keys=True)
    return {
        "backend": backend,
        "workers": workers,
        "search_wall_s": round(outcome.wall_s, 2),
        "setup_s": round(setup_s, 2),
        "episodes": outcome.episodes,
        "real_measurements": outcome.real_measurements,
        "failed_candidates": sum(1 for r in outcome.records if r["error"]),
        "device_jobs": (parallel.get("devices") or {}).get("jobs"),
        "candidates_sha256": hashlib.sha256(policies.encode()).hexdigest()[:16],
        # The machine's 1-minute load right after: other work on it slows every run.
        "load_avg_after": round(os.getloadavg()[0], 2),
    }


def warm_up(profile, work: Path) -> None:
    """One measurement on each device: its job process and the floor's peaks are ready."""
    from pipeline.measure.bench import bench_artifact
    from pipeline.search.parallel.fleet import device_name

    original = work / "original.onnx"
    for device in profile.fleet:
        single = profile.model_copy(update={"device": device, "devices": []})
        bench_artifact(single, original)
        print(f"warmed up {device_name(single)}", flush=True)


def main() -> None:
    import ray
    from device_agent import Agent

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4000, help="timed runs per measurement")
    parser.add_argument("--candidate-steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ray_scaleout.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        token = "bench-" + os.urandom(16).hex()
        os.environ[TOKEN_ENV] = token
        with (
            Agent(root / "agent-a", token=token) as first,
            Agent(root / "agent-b", token=token) as second,
        ):
            profile = fleet_profile([first.url, second.url], args.repeats)
            evaluator(profile, root / "warm", args.candidate_steps).close()
            warm_up(profile, root / "warm")
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
            try:
                runs = []
                for backend, workers in (("ray", 1), ("ray", 2), ("local", 1)):
                    runs.append(
                        one_search(profile, backend, workers, args, root / f"{backend}{workers}")
                    )
                    print(json.dumps(runs[-1]), flush=True)
            finally:
                ray.shutdown()
    one, two = runs[0], runs[1]
    result = {
        "benchmark": "ray_scaleout",
        "what": "random search, one seed: Ray with 1 and 2 workers, two device agents on 127.0.0.1",
        "machine": {"cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before]},
        "model": "ResNet-10 on digits 3x32x32",
        "episodes": args.episodes,
        "measure_repeats": args.repeats,
        "candidate_steps": args.candidate_steps,
        "runs": runs,
        "speedup_2_vs_1_workers": round(one["search_wall_s"] / two["search_wall_s"], 2),
        "same_candidates": len({run["candidates_sha256"] for run in runs}) == 1,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup_2_vs_1_workers", "same_candidates")}))


if __name__ == "__main__":
    main()
