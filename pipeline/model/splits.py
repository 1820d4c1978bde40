"""The four disjoint splits every data source yields, and how a labelled set is cut into them.

`calib` is its own split: INT8 calibration never sees the images that accuracy is measured on.
Every cut is stratified where it can be and recorded (seed, fractions, indices), so a run's
manifest says exactly which samples each number was computed on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from pipeline.core.errors import DataError

SPLIT_NAMES = ("train", "calib", "val", "test")
# Fractions of the whole data set; train gets the rest (70%)
SPLIT_FRACTIONS = {"test": 0.2, "val": 0.1, "calib": 0.1}


@dataclass
class Splits:
    """Four disjoint datasets yielding (x float32 (C, H, W), y int64), and how they were made.

    Attributes:
        train: for training and recovery fine-tuning.
        calib: only for INT8 calibration.
        val: for scoring candidates during the search.
        test: only for the final evaluation and validation.
        num_classes: number of classes (labels are 0 .. num_classes - 1).
        record: JSON-ready provenance: source, seed, sizes, indices per split, preprocessing.
    """

    train: Dataset
    calib: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    record: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Dataset]:
        """The four datasets by split name."""
        return {name: getattr(self, name) for name in SPLIT_NAMES}

    @property
    def sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {name: len(ds) for name, ds in self.as_dict().items()}


def check_channels(channels: int, source: str) -> None:
    """Refuse an input shape an image source cannot fill: it gives greyscale or RGB only."""
    if channels not in (1, 3):
        raise DataError(
            f"{source} gives 1 (greyscale) or 3 (RGB) channels, but input.shape asks for "
            f"{channels}; set input.shape to (1, H, W) or (3, H, W)"
        )


def split_indices(labels: np.ndarray, seed: int) -> tuple[dict[str, list[int]], bool]:
    """Split sample indices 0..N-1 into train / calib / val / test, stratified by label.

    Args:
        labels: (N,) class index of each sample.
        seed: random state of the split.

    Returns:
        Sorted indices per split name, and whether every cut could be stratified (a class with
        a single sample, or fewer samples in a split than classes, falls back to a random cut).
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = len(labels)
    if n < len(SPLIT_NAMES):
        raise DataError(f"{n} samples are too few to split into {', '.join(SPLIT_NAMES)}")
    pool, out, stratified = np.arange(n), {}, True
    for name, fraction in SPLIT_FRACTIONS.items():
        count = max(1, round(fraction * n))
        try:
            pool, taken = train_test_split(
                pool, test_size=count, stratify=labels[pool], random_state=seed
            )
        except ValueError:  # too few samples per class for a stratified cut
            pool, taken = train_test_split(pool, test_size=count, random_state=seed)
            stratified = False
        out[name] = sorted(int(i) for i in taken)
    out["train"] = sorted(int(i) for i in pool)
    indices = {name: out[name] for name in SPLIT_NAMES}
    _assert_disjoint(indices, n)
    return indices, stratified


def _assert_disjoint(indices: Mapping[str, list[int]], n: int) -> None:
    """Guard the property every number in a report rests on: no sample is in two splits."""
    every = [i for idx in indices.values() for i in idx]
    if len(set(every)) != len(every) or (every and not 0 <= min(every) <= max(every) < n):
        raise RuntimeError("internal error: data splits overlap or index outside the data set")


def subset_splits(
    full: Dataset, indices: dict[str, list[int]], num_classes: int, record: dict[str, Any]
) -> Splits:
    """The splits of `full` at `indices`, their sizes and indices added to the record."""
    parts = {name: Subset(full, indices[name]) for name in SPLIT_NAMES}
    record = {
        **record,
        "num_classes": num_classes,
        "sizes": {name: len(idx) for name, idx in indices.items()},
        "indices": indices,
    }
    return Splits(**parts, num_classes=num_classes, record=record)


def split_record(seed: int, stratified: bool) -> dict[str, Any]:
    """The part of a source's record that says how it was split."""
    return {"seed": seed, "stratified": stratified, "split_fractions": dict(SPLIT_FRACTIONS)}
