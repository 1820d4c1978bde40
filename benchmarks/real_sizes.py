"""Real sizes: MobileNetV2 and ResNet-50 at 3x224x224, batch 1, on the unedited CPU profile.

Three parts, each written into the JSON as it finishes (`--parts` picks some):

- `runs`: `pipeline run --policy uniform:0.5` and `uniform:0.5:int8` end to end on a generated
  image folder, with weights this script trains first (a few hundred steps on the same folder,
  so the original is above chance and the run's gates mean something). Recorded: the measured
  speedup with its interval, accuracies, the run's wall time and peak memory (max RSS of its
  process tree).
- `latency`: the latency model against reality. Random per-layer policies (keep ratios and
  precisions) are pruned, exported and measured for real by the search's own candidate
  evaluator; the latency model predicts each before it learns its measurement, in order, as
  in a search. Recorded: median and p90 absolute relative error over the predicted ones.
- `stream`: a 5,000-image folder, larger than the in-memory limit, through `pipeline run` at
  224x224: the images are streamed from disk, and the run's peak memory is recorded.

Accuracy is not the point here (the images are generated); the pipeline at real sizes is.
Timing figures need a quiet machine.

    python benchmarks/real_sizes.py [--models mobilenet_v2 resnet50] [--parts runs latency stream]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ROOT, run_once

RESULTS = ROOT / "benchmarks" / "results"
SHAPE = (3, 224, 224)
SHAPE_ARG = "3x224x224"
CLASSES = 10
POLICIES = ("uniform:0.5", "uniform:0.5:int8")


def write_images(folder: Path, per_class: int, seed: int = 0) -> Path:
    """Ten learnable classes of 224x224 JPEGs: each class a hue and a stripe direction, with
    noise, random brightness and a random phase, so a network must look at the image."""
    from PIL import Image

    if (folder / "done").is_file():
        return folder
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32)
    for c in range(CLASSES):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        hue = np.array([np.cos(c), np.sin(c * 1.7), np.cos(c * 2.3)]) * 0.35 + 0.5
        angle = np.pi * c / CLASSES
        for i in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 6.0 + phase)
            pixels = hue * rng.uniform(0.6, 1.0) + 0.25 * stripes[..., None]
            pixels += rng.normal(0, 0.15, pixels.shape)
            image = (np.clip(pixels, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"class{c}" / f"{i}.jpg", quality=90)
    (folder / "done").write_text("")
    return folder


def train_weights(arch: str, folder: Path, out: Path, steps: int) -> dict[str, Any]:
    """A baseline for the runs: `arch` trained from scratch on the folder's training split."""
    import torch
    from safetensors.torch import save_file

    from pipeline.core.train_spec import TrainSpec
    from pipeline.model.data import load_data
    from pipeline.model.evaluate import accuracy, stack, torch_logits
    from pipeline.model.finetune import train
    from pipeline.model.models import build_model

    if out.is_file():
        return json.loads(out.with_suffix(".json").read_text())
    torch.manual_seed(0)
    splits = load_data(f"imagefolder:{folder}", SHAPE, seed=0)
    model = build_model(arch, splits.num_classes)
    spec = TrainSpec(steps=steps, lr=0.05, batch_size=32, seed=0, schedule="onecycle", bn_batches=4)
    started = time.time()
    train(model, splits.train, spec, description=f"training {arch}")
    x, y = stack(splits.val)
    info = {"steps": steps, "val_accuracy": accuracy(torch_logits(model, x), y)}
    info["train_s"] = round(time.time() - started, 1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps(info))
    return info


def pipeline_run(
    arch: str, weights: Path, folder: Path, policy: str, out: Path, steps: int
) -> dict[str, Any]:
    """One `pipeline run` on the shipped CPU profile: its figures, wall time and peak memory."""
    config = out / "run.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"finetune": {"steps": steps, "qat_steps": steps}}))
    cmd = [
        str(ROOT / ".venv" / "bin" / "pipeline"), "run", "--target", "cpu",
        "--config", str(config), "--model", arch, "--weights", str(weights),
        "--input-shape", SHAPE_ARG, "--data", f"imagefolder:{folder}", "--policy", policy,
        "--out", str(out / "runs"), "--no-progress",
    ]  # fmt: skip
    code, wall, rss_kb = run_once(cmd, out / "log.txt", timeout_s=3 * 3600)
    entry: dict[str, Any] = {
        "policy": policy, "exit_code": code, "wall_s": round(wall, 1),
        "peak_rss_mb": round(rss_kb / 1024),
    }  # fmt: skip
    reports = sorted((out / "runs").glob("*/report.json"))
    if reports:
        r = json.loads(reports[-1].read_text())
        entry.update(
            speedup=r["speedup"],
            speedup_ci95=r.get("speedup_ci95"),
            original_ms=r["original"]["latency_ms"]["median"],
            deployed_ms=r["deployed"]["latency_ms"]["median"],
            original_accuracy=r["original"]["accuracy"],
            deployed_accuracy=r["deployed"]["accuracy"],
            original_accuracy_ci95=r["original"].get("accuracy_ci95"),
            deployed_accuracy_ci95=r["deployed"].get("accuracy_ci95"),
            accuracy_drop_ci95=r.get("accuracy_drop_ci95"),
            test_images=r.get("test_images"),
            failed_gates=r["gates"].get("failed", []),
            data=_data_summary(reports[-1].parent / "manifest.json"),
        )
    return entry


def _data_summary(manifest: Path) -> dict[str, Any]:
    """How the run read its images (streamed or in memory), without the split indices."""
    data = json.loads(manifest.read_text()).get("data") or {}
    return {k: data.get(k) for k in ("num_samples", "in_memory", "sizes", "skipped_files")}


def random_policy(space: Any, rng: np.random.Generator) -> Any:
    """Per-layer keep ratios in [min_keep, 1]; one precision for all, or one per layer."""
    from pipeline.core.policy import LayerAction, Policy

    precisions = list(space.precisions)

    def draw() -> Any:
        return precisions[int(rng.integers(len(precisions)))]

    shared = draw() if rng.random() < 0.5 else None
    layers = {}
    for layer in space.layers:
        keep = float(rng.uniform(space.min_keep, 1.0)) if layer.prunable else 1.0
        precision = shared if shared is not None else draw()
        layers[layer.name] = LayerAction(keep, precision)
    return Policy(layers)


def latency_model_error(arch: str, weights: Path, folder: Path, count: int) -> dict[str, Any]:
    """`count` random policies measured for real; the latency model predicts each in turn."""
    import tempfile

    from exporters import export_onnx
    from pipeline.core.profile import load_profile, with_input_shape
    from pipeline.core.train_spec import TrainSpec
    from pipeline.measure.latency_model import LatencyModel
    from pipeline.model.data import load_data
    from pipeline.model.models import build_model, load_weights
    from pipeline.model.prune import prune_model
    from pipeline.search.build import build_evaluator
    from pipeline.search.latency import candidate_features

    profile = with_input_shape(load_profile("cpu"), SHAPE)
    splits = load_data(f"imagefolder:{folder}", SHAPE, seed=0)
    original = build_model(arch, splits.num_classes)
    load_weights(original, weights)
    original.eval()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(original, SHAPE, Path(tmp) / "original.onnx")
        no_training = TrainSpec(steps=0, bn_batches=2, batch_size=32)
        evaluator = build_evaluator(
            original, splits, profile, onnx_path, no_training, None, latency_model=False
        )
        try:
            space = evaluator.space
            model = LatencyModel(space)
            for i in range(count):
                policy = random_policy(space, rng)
                result = evaluator.evaluate(policy)
                if result.latency_ms is None:
                    rows.append({"candidate": i, "error": result.error})
                    continue
                pruned = copy.deepcopy(original)
                prune_model(pruned, policy, SHAPE, profile.channel_multiple, profile.min_keep_ratio)
                x = candidate_features(model, pruned, policy)
                predicted = model.predict(x)
                model.observe(x, result.latency_ms, predicted)
                rows.append(
                    {"candidate": i, "measured_ms": result.latency_ms, "predicted_ms": predicted}
                )
                print(f"  {arch} {i}: {result.latency_ms:.2f} ms, predicted {predicted}")
        finally:
            evaluator.close()
    errors = np.asarray(model.errors)
    return {
        "policies": count,
        "measured": sum("measured_ms" in r for r in rows),
        "predicted": len(errors),
        "median_abs_error": float(np.median(errors)) if len(errors) else None,
        "p90_abs_error": float(np.percentile(errors, 90)) if len(errors) else None,
        "original_ms": space.original_latency_ms,
        "precision_latency_ms": space.precision_latency_ms,
        "candidates": rows,
    }


def _pct(x: float | None, ci: list[float] | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _drop(run: dict[str, Any]) -> str:
    low, high = run.get("accuracy_drop_ci95") or (None, None)
    if low is None or "original_accuracy" not in run:
        return "-"
    drop = run["original_accuracy"] - run["deployed_accuracy"]
    return f"{100 * drop:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md's 224x224 section."""
    lines = [
        "| model | policy | original (ms) | deployed (ms) | speedup [95%] | accuracy "
        "original -> deployed | drop, points [95%] (test images) | wall (s) | peak RSS (MB) "
        "| exit |",
        "|---|---|---:|---:|---|---|---|---:|---:|---|",
    ]
    for arch, entry in results.items():
        for r in entry.get("runs", []) if isinstance(entry, dict) else []:
            ci = r.get("speedup_ci95") or [float("nan")] * 2
            lines.append(
                f"| {arch} | `{r['policy']}` | {r.get('original_ms', 0):.2f} | "
                f"{r.get('deployed_ms', 0):.2f} | {r.get('speedup', 0):.2f}x "
                f"[{ci[0]:.2f}, {ci[1]:.2f}] | "
                f"{_pct(r.get('original_accuracy'), r.get('original_accuracy_ci95'))} -> "
                f"{_pct(r.get('deployed_accuracy'), r.get('deployed_accuracy_ci95'))} | "
                f"{_drop(r)} ({r.get('test_images')}) | "
                f"{r['wall_s']:.0f} | {r['peak_rss_mb']} | {r['exit_code']} |"
            )
    lines += [
        "",
        "| model | random policies | predicted | median error | p90 error | original FP32 (ms) "
        "| original INT8 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, entry in results.items():
        lm = entry.get("latency_model") if isinstance(entry, dict) else None
        if lm:
            by = lm["precision_latency_ms"]
            lines.append(
                f"| {arch} | {lm['measured']} | {lm['predicted']} | "
                f"{_pct(lm['median_abs_error'])} | {_pct(lm['p90_abs_error'])} | "
                f"{by.get('fp32', 0):.2f} | {by.get('int8', 0):.2f} |"
            )
    stream = results.get("stream")
    if stream:
        lines += [
            "",
            f"Streaming: {stream['model']} on {stream['images']} images, "
            f"in memory: {(stream.get('data') or {}).get('in_memory')}, peak RSS "
            f"{stream['peak_rss_mb']} MB, wall {stream['wall_s']:.0f} s, "
            f"exit {stream['exit_code']}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--parts", nargs="+", default=["runs", "latency", "stream"])
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--policies", type=int, default=36, help="random policies per model")
    parser.add_argument("--stream-images", type=int, default=5000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/real-sizes"))
    parser.add_argument("--out", type=Path, default=RESULTS / "real_sizes.json")
    parser.add_argument("--table", action="store_true", help="only rewrite the markdown")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.table:
        args.out.with_suffix(".md").write_text(markdown(results))
        return

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results))

    small = write_images(args.work / "images-400", per_class=40)
    for arch in args.models:
        weights = args.work / f"{arch}.safetensors"
        entry = results.setdefault(arch, {})
        entry["baseline"] = train_weights(arch, small, weights, args.train_steps)
        save()
        if "runs" in args.parts:
            steps = args.finetune_steps
            entry["runs"] = [
                pipeline_run(arch, weights, small, p, args.work / f"{arch}-{p}", steps)
                for p in POLICIES
            ]
            save()
        if "latency" in args.parts:
            entry["latency_model"] = latency_model_error(arch, weights, small, args.policies)
            save()
    if "stream" in args.parts:
        per_class = args.stream_images // CLASSES
        big = write_images(args.work / f"images-{args.stream_images}", per_class=per_class)
        arch = args.models[0]
        results["stream"] = {
            "model": arch,
            "images": per_class * CLASSES,
            **pipeline_run(
                arch, args.work / f"{arch}.safetensors", big, "uniform:0.5",
                args.work / f"{arch}-stream", args.finetune_steps,
            ),
        }  # fmt: skip
        save()
    print(markdown(results))


if __name__ == "__main__":
    main()
