"""The demo baseline: real training at a tiny size, cached atomically, loaded on the next call."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from pipeline.model.demo import (
    DEMO_ARCH,
    default_cache_dir,
    demo_model,
    demo_recipe,
    demo_spec,
    recipe_hash,
)

STEPS = 12  # enough to exercise training and caching; accuracy is not the point here


def demo(splits, cache_dir, **kwargs):
    return demo_model(
        splits, cache_dir, show_progress=False, train_steps=STEPS, min_accuracy=0.0, **kwargs
    )


def test_trains_once_then_loads_from_cache(digits_splits, tmp_path):
    model, info = demo(digits_splits, tmp_path)
    assert info["cached"] is False and info["arch"] == DEMO_ARCH
    assert info["input_shape"] == (3, 32, 32) and 0.0 <= info["test_accuracy"] <= 1.0
    assert info["weights"] == tmp_path / f"demo-{info['hash']}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"demo-{info['hash']}.json",
        f"demo-{info['hash']}.safetensors",
    ]  # no temporary files left behind
    meta = json.loads((tmp_path / f"demo-{info['hash']}.json").read_text())
    assert meta["recipe"]["train_spec"]["steps"] == STEPS

    again, info2 = demo(digits_splits, tmp_path)
    assert info2["cached"] is True and info2["hash"] == info["hash"]
    assert info2["test_accuracy"] == info["test_accuracy"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key

    with pytest.raises(RuntimeError, match="test accuracy"):
        demo_model(digits_splits, tmp_path, False, train_steps=STEPS, min_accuracy=1.01)


def test_incomplete_cache_entry_is_retrained(digits_splits, tmp_path):
    key = recipe_hash(demo_recipe(digits_splits, demo_spec(digits_splits, STEPS)))
    weights = tmp_path / f"demo-{key}.safetensors"
    weights.write_bytes(b"half a file")  # as if killed mid-write, without the JSON beside it
    _, info = demo(digits_splits, tmp_path)
    assert info["cached"] is False and info["hash"] == key
    assert weights.stat().st_size > 1000


def test_recipe_hash_covers_the_recipe(digits_splits):
    spec = demo_spec(digits_splits)
    assert spec.steps == 135 and spec.schedule == "onecycle" and spec.lr == 0.1
    base = recipe_hash(demo_recipe(digits_splits, spec))
    assert base == recipe_hash(demo_recipe(digits_splits, spec)) and len(base) == 16
    assert base != recipe_hash(demo_recipe(digits_splits, replace(spec, lr=0.05)))
    moved = replace(digits_splits, record={**digits_splits.record, "indices": {"train": [0, 1]}})
    assert base != recipe_hash(demo_recipe(moved, spec))


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PIPELINE_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "pipeline")
