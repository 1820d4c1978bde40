"""digits-hard: real digits over real photos, split by source digit, deterministic, cached."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.model import digits_hard
from pipeline.model.data import load_data

SMALL = {"train": 300, "calib": 20, "val": 60, "test": 200}


def test_source_digits_are_split_before_augmenting(tmp_path) -> None:
    parts, record = digits_hard.load_cached((3, 24, 24), 0, tmp_path, SMALL)
    sources = record["source_digits"]
    every = [i for idx in sources.values() for i in idx]
    assert len(every) == len(set(every)) == 1797  # every source digit in exactly one split
    assert abs(len(sources["test"]) - 0.25 * 1797) <= 1
    rendered = digits_hard.generate((3, 24, 24), 0, SMALL)
    for name in SMALL:
        used = set(rendered[name][2].tolist())
        assert used <= set(sources[name])  # no image derives from another split's digit
    assert {name: len(ds) for name, ds in parts.items()} == SMALL


def test_images_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    a = digits_hard.generate((3, 16, 16), 0, SMALL)["val"][0]
    b = digits_hard.generate((3, 16, 16), 0, SMALL)["val"][0]
    c = digits_hard.generate((3, 16, 16), 1, SMALL)["val"][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_digit_is_composited_over_a_photo(tmp_path) -> None:
    images, labels, _ = digits_hard.generate((3, 32, 32), 0, SMALL)["test"]
    assert images.dtype == torch.uint8 and images.shape == (200, 3, 32, 32)
    # photo backgrounds: colour and texture, not a flat field
    assert images.float().std(dim=(2, 3)).mean() > 10
    assert set(labels.tolist()) == set(range(10))


def test_the_set_is_cached_and_loaded_through_the_data_spec(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path))
    splits = load_data("digits-hard", (1, 12, 12), seed=0)
    files = list(tmp_path.glob("digits-hard-*.safetensors"))
    assert len(files) == 1
    assert splits.sizes == digits_hard.SIZES
    assert splits.sizes["test"] >= 10000 and splits.sizes["val"] >= 2000
    x, y = splits.test[0]
    assert x.shape == (1, 12, 12) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert splits.record["split"].startswith("source digits split first")
    again = load_data("digits-hard", (1, 12, 12), seed=0)  # from the cache this time
    assert np.array_equal(again.val.images.numpy(), splits.val.images.numpy())


def test_a_damaged_cache_entry_is_rendered_again(tmp_path) -> None:
    key = digits_hard.cache_key((1, 12, 12), 0, SMALL)
    path = tmp_path / f"digits-hard-{key}.safetensors"
    path.write_bytes(b"not a safetensors file")
    parts, _ = digits_hard.load_cached((1, 12, 12), 0, tmp_path, SMALL)
    assert len(parts["test"]) == SMALL["test"]
