"""Data sources and their disjoint train / calib / val / test splits.

Three sources: the embedded `digits` set (scikit-learn's 1,797 real 8x8 handwritten digits, used by
the demo and the tests), `imagefolder:DIR` (one sub-folder per class), and `module:function` (a
user's function returning a Dataset or the four splits). `calib` is its own split: INT8
calibration never sees the images that accuracy is measured on. Every split is recorded (source,
seed, indices, preprocessing) so a run's manifest says exactly what each number was computed on.

The splits and how a labelled set is cut into them are in `pipeline.model.splits`; the image
folder source, the one that reads files, is in `pipeline.model.imagefolder`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from pipeline.core.errors import DataError
from pipeline.model.evaluate import loader
from pipeline.model.imagefolder import load_imagefolder
from pipeline.model.models import accepts_keyword, import_callable, is_callable_spec
from pipeline.model.splits import (
    SPLIT_NAMES,
    Splits,
    check_channels,
    split_indices,
    split_record,
    subset_splits,
)

DIGITS = "digits"
DIGITS_HARD = "digits-hard"
DIGITS_MEAN, DIGITS_STD = 0.5, 0.5
_FORMS = (
    "'digits' (embedded demo set), 'digits-hard' (embedded benchmark set), "
    "'imagefolder:DIR' (DIR/<class>/<image>) or 'module:function'"
)


def load_data(spec: str | None, input_shape: tuple[int, int, int], seed: int = 0) -> Splits:
    """Load a data source and split it into train / calib / val / test.

    Args:
        spec: None or "digits" for the embedded set; "digits-hard" for the embedded benchmark
            set (`pipeline.model.digits_hard`); "imagefolder:DIR"; or "module:function"
            returning a Dataset (split here) or a dict of the four splits. The function gets
            `input_shape=` when its signature accepts it.
        input_shape: (C, H, W) the model takes; images are resized and converted to it.
        seed: seed of the stratified split (test 20%, val 10%, calib 10%, train the rest).

    Returns:
        The splits with their record.

    Raises:
        DataError: unknown spec form, missing or empty folder, or a dataset of the wrong shape.
    """
    shape = _check_shape(input_shape)
    if spec is None or spec == DIGITS:
        return _load_digits(shape, seed)
    if spec == DIGITS_HARD:
        return _load_digits_hard(shape, seed)
    if spec.startswith("imagefolder:"):
        return load_imagefolder(spec.partition(":")[2], shape, seed)
    if is_callable_spec(spec):
        return _load_callable(spec, shape, seed)
    raise DataError(f"unknown data source '{spec}'; use {_FORMS}")


def _check_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise DataError(f"input shape must be (C, H, W) of positive sizes, got {input_shape}")
    return shape  # type: ignore[return-value]


# --- digits ------------------------------------------------------------------------------------


def _load_digits(shape: tuple[int, int, int], seed: int) -> Splits:
    from sklearn.datasets import load_digits

    c, h, w = shape
    check_channels(c, "digits")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0,1]
    images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    images = images.sub_(DIGITS_MEAN).div_(DIGITS_STD).repeat(1, c, 1, 1)  # (N, C, H, W)
    labels = torch.from_numpy(bunch.target).long()
    indices, stratified = split_indices(bunch.target, seed)
    record = {
        "source": DIGITS,
        "description": "scikit-learn load_digits: 8x8 greyscale handwritten digits 0-9",
        "num_samples": len(labels),
        **split_record(seed, stratified),
        "preprocessing": {
            "scale": "pixel / 16 (digits are 0..16)",
            "resize": [h, w],
            "interpolation": "bilinear",
            "channels": c,
            "channel_mode": "greyscale replicated" if c == 3 else "greyscale",
            "mean": [DIGITS_MEAN] * c,
            "std": [DIGITS_STD] * c,
        },
    }
    return subset_splits(TensorDataset(images, labels), indices, 10, record)


def _load_digits_hard(shape: tuple[int, int, int], seed: int) -> Splits:
    from pipeline.core.artifacts import default_cache_dir
    from pipeline.model import digits_hard

    check_channels(shape[0], DIGITS_HARD)
    parts, record = digits_hard.load_cached(shape, seed, default_cache_dir())
    return Splits(**parts, num_classes=10, record=record)


# --- module:function ---------------------------------------------------------------------------


def _load_callable(spec: str, shape: tuple[int, int, int], seed: int) -> Splits:
    fn = import_callable(spec, DataError)
    kwargs = {"input_shape": shape} if accepts_keyword(fn, "input_shape") else {}
    try:
        result = fn(**kwargs)
    except DataError:
        raise
    except Exception as exc:  # user code: surface its failure as one line
        raise DataError(f"'{spec}' raised {type(exc).__name__}: {_first_line(exc)}") from exc
    if isinstance(result, Mapping):
        return _from_split_dict(spec, result, shape)
    if isinstance(result, Dataset):
        return _from_dataset(spec, result, shape, seed)
    raise DataError(
        f"'{spec}' returned {type(result).__name__}; expected a torch Dataset or a dict with "
        f"keys {', '.join(SPLIT_NAMES)} holding Datasets"
    )


def _from_dataset(spec: str, dataset: Dataset, shape: tuple[int, int, int], seed: int) -> Splits:
    _check_dataset(dataset, shape, f"'{spec}'")
    labels = _labels(dataset, spec)
    indices, stratified = split_indices(labels, seed)
    record = {"source": spec, "num_samples": len(labels), **split_record(seed, stratified)}
    record["preprocessing"] = {"input_shape": list(shape), "by": spec}
    return subset_splits(dataset, indices, int(labels.max()) + 1, record)


def _from_split_dict(spec: str, parts: Mapping[str, Any], shape: tuple[int, int, int]) -> Splits:
    missing = [k for k in SPLIT_NAMES if k not in parts]
    unknown = [str(k) for k in parts if k not in SPLIT_NAMES]
    if missing or unknown:
        raise DataError(
            f"'{spec}' returned a dict with missing keys {missing} / unknown keys {unknown}; "
            f"expected exactly {', '.join(SPLIT_NAMES)}"
        )
    for name in SPLIT_NAMES:
        _check_dataset(parts[name], shape, f"'{spec}' split '{name}'")
    labels = {name: _labels(parts[name], spec) for name in SPLIT_NAMES}
    record: dict[str, Any] = {"source": spec, "split": f"given by {spec}"}
    indices = _shared_subset_indices(spec, parts)
    if indices is not None:
        record["indices"] = indices
    record["sizes"] = {name: len(labels[name]) for name in SPLIT_NAMES}
    record["preprocessing"] = {"input_shape": list(shape), "by": spec}
    num_classes = int(max(lab.max() for lab in labels.values())) + 1
    record["num_classes"] = num_classes
    return Splits(**{n: parts[n] for n in SPLIT_NAMES}, num_classes=num_classes, record=record)


def _shared_subset_indices(spec: str, parts: Mapping[str, Any]) -> dict[str, list[int]] | None:
    """Indices of the splits when all four are Subsets of one dataset; refuse an overlap."""
    bases = {id(p.dataset) for p in parts.values() if isinstance(p, Subset)}
    if len(bases) != 1 or not all(isinstance(parts[n], Subset) for n in SPLIT_NAMES):
        return None
    indices = {n: [int(i) for i in parts[n].indices] for n in SPLIT_NAMES}
    seen: dict[int, str] = {}
    for name, idx in indices.items():
        for i in idx:
            if i in seen:
                raise DataError(
                    f"'{spec}': sample {i} is in both '{seen[i]}' and '{name}'; splits must be "
                    "disjoint (accuracy on a split the model trained on means nothing)"
                )
            seen[i] = name
    return indices


def _check_dataset(dataset: Any, shape: tuple[int, int, int], where: str) -> None:
    if not isinstance(dataset, Dataset) or isinstance(dataset, IterableDataset):
        raise DataError(f"{where} is a {type(dataset).__name__}; expected a map-style Dataset")
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise DataError(f"{where} is empty or has no length")
    sample = dataset[0]
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        raise DataError(f"{where} yields {type(sample).__name__}; expected (x, label) pairs")
    x = sample[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or tuple(x.shape) != shape:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(
            f"{where} yields x of {got}, but input.shape is {shape}; return float tensors "
            "(C, H, W) matching the profile's input.shape"
        )


def _labels(dataset: Any, spec: str) -> np.ndarray:
    """(N,) int64 labels, read without decoding inputs where the dataset exposes them."""
    if isinstance(dataset, Subset):
        labels = _labels(dataset.dataset, spec)[np.asarray(dataset.indices, dtype=np.int64)]
    elif isinstance(dataset, TensorDataset):
        labels = dataset.tensors[-1].numpy()
    elif getattr(dataset, "targets", None) is not None and len(dataset.targets) == len(dataset):
        labels = np.asarray(dataset.targets)
    else:
        labels = np.concatenate([np.asarray(y) for _, y in loader(dataset)])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"'{spec}': labels must be class indices 0 .. K-1 (one int per sample)")
    return labels.astype(np.int64)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
