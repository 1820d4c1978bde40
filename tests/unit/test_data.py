"""Data sources and splits, on the real digits set and real PNG files."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.model.data import load_data
from pipeline.model.evaluate import stack
from pipeline.model.splits import SPLIT_NAMES, Splits, split_indices


def labels_of(splits: Splits, name: str) -> np.ndarray:
    return stack(getattr(splits, name))[1]


def test_digits_splits_are_disjoint_and_cover_the_set(digits_splits):
    indices = digits_splits.record["indices"]
    every = [i for name in SPLIT_NAMES for i in indices[name]]
    assert len(every) == len(set(every)) == 1797
    assert digits_splits.sizes == {"train": 1078, "calib": 180, "val": 180, "test": 359}
    assert digits_splits.record["sizes"] == digits_splits.sizes
    assert digits_splits.num_classes == 10


def test_digits_samples_are_normalised_tensors(digits_splits):
    x, y = digits_splits.test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    inputs, _ = stack(digits_splits.val)
    assert inputs.min() >= -1.0 and inputs.max() <= 1.0 and inputs.std() > 0.1
    assert np.array_equal(inputs[:, 0], inputs[:, 2])  # greyscale replicated to 3 channels


def test_digits_split_is_stratified(digits_splits):
    for name in SPLIT_NAMES:
        counts = np.bincount(labels_of(digits_splits, name), minlength=10)
        assert counts.min() > 0.8 * counts.mean(), (name, counts)
    assert digits_splits.record["stratified"] is True


def test_digits_record_is_json_and_says_how(digits_splits):
    record = json.loads(json.dumps(digits_splits.record))
    assert record["source"] == "digits" and record["seed"] == 0
    pre = record["preprocessing"]
    assert pre["resize"] == [32, 32] and pre["channels"] == 3 and pre["mean"] == [0.5] * 3


def test_digits_seed_controls_the_split():
    a = load_data(None, (1, 8, 8), seed=1).record["indices"]
    b = load_data("digits", (1, 8, 8), seed=1).record["indices"]
    c = load_data("digits", (1, 8, 8), seed=2).record["indices"]
    assert a == b and a["test"] != c["test"]


def test_digits_rejects_other_channel_counts():
    with pytest.raises(DataError, match=r"input\.shape"):
        load_data("digits", (2, 8, 8))


def test_split_indices_of_a_tiny_set_fall_back_to_random():
    indices, stratified = split_indices(np.array([0, 1, 2, 0, 1, 2]), seed=0)
    assert sorted(i for idx in indices.values() for i in idx) == list(range(6))
    assert all(indices[name] for name in SPLIT_NAMES) and not stratified


def write_images(root, classes=("cat", "dog", "owl"), per_class=6, size=(10, 12)):
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            pixels[..., label] = 255  # each class has a distinct colour
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_imagefolder(tmp_path):
    write_images(tmp_path / "imgs")
    splits = load_data(f"imagefolder:{tmp_path / 'imgs'}", (3, 16, 16), seed=0)
    assert splits.num_classes == 3 and sum(splits.sizes.values()) == 18
    x, y = splits.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert splits.record["classes"] == ["cat", "dog", "owl"] and splits.record["in_memory"]
    every = [i for idx in splits.record["indices"].values() for i in idx]
    assert sorted(every) == list(range(18))
    for name in SPLIT_NAMES:  # labels still belong to their images after the split
        inputs, labels = stack(getattr(splits, name))
        assert np.array_equal(inputs.mean(axis=(2, 3)).argmax(axis=1), labels)


def test_imagefolder_greyscale(tmp_path):
    write_images(tmp_path / "imgs", per_class=4)
    splits = load_data(f"imagefolder:{tmp_path / 'imgs'}", (1, 8, 8))
    assert splits.test[0][0].shape == (1, 8, 8)


def test_empty_imagefolder(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found in .*<class>/<image>"):
        load_data(f"imagefolder:{tmp_path / 'empty'}", (3, 16, 16))


def test_missing_imagefolder(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_data(f"imagefolder:{tmp_path / 'nope'}", (3, 16, 16))


DATA_MODULE = """
import torch
from torch.utils.data import Subset, TensorDataset

def dataset(input_shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, *input_shape, generator=g)
    return TensorDataset(x, torch.arange(40) % 4)

def four_splits():
    full = dataset((1, 4, 4))
    return {n: Subset(full, range(i * 10, i * 10 + 10))
            for i, n in enumerate(["train", "calib", "val", "test"])}

def overlapping():
    full = dataset((1, 4, 4))
    return {n: Subset(full, range(0, 10)) for n in ["train", "calib", "val", "test"]}

def wrong():
    return [1, 2, 3]
"""


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(textwrap.dedent(DATA_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.usefixtures("data_module")
def test_module_function_one_dataset_is_split():
    splits = load_data("my_data:dataset", (1, 4, 4), seed=0)
    assert splits.num_classes == 4 and sum(splits.sizes.values()) == 40
    assert splits.record["source"] == "my_data:dataset"


@pytest.mark.usefixtures("data_module")
def test_module_function_four_splits():
    splits = load_data("my_data:four_splits", (1, 4, 4))
    assert splits.sizes == dict.fromkeys(SPLIT_NAMES, 10)
    assert splits.record["indices"]["test"] == list(range(30, 40))


@pytest.mark.usefixtures("data_module")
@pytest.mark.parametrize(
    ("spec", "shape", "fragment"),
    [
        ("my_data:overlapping", (1, 4, 4), "disjoint"),
        ("my_data:wrong", (1, 4, 4), "returned list"),
        ("my_data:four_splits", (3, 4, 4), r"input\.shape"),
        ("my_data:absent", (1, 4, 4), "no attribute"),
    ],
)
def test_module_function_bad_results(spec, shape, fragment):
    with pytest.raises(DataError, match=fragment):
        load_data(spec, shape)


def test_unknown_data_spec_lists_the_forms():
    with pytest.raises(DataError) as exc:
        load_data("s3://bucket/data", (3, 8, 8))
    message = str(exc.value)
    assert "digits" in message and "imagefolder:DIR" in message and "module:function" in message
