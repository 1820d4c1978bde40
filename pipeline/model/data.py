"""Data sources and their disjoint train / calib / val / test splits.

Three sources: the embedded `digits` set (scikit-learn's 1,797 real 8x8 handwritten digits, used by
the demo and the tests), `imagefolder:DIR` (one sub-folder per class), and `module:function` (a
user's function returning a Dataset or the four splits). `calib` is its own split: INT8
calibration never sees the images that accuracy is measured on. Every split is recorded (source,
seed, indices, preprocessing) so a run's manifest says exactly what each number was computed on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from pipeline.core.errors import DataError
from pipeline.model.evaluate import loader
from pipeline.model.models import accepts_keyword, import_callable, is_callable_spec

SPLIT_NAMES = ("train", "calib", "val", "test")
# Fractions of the whole data set; train gets the rest (70%)
SPLIT_FRACTIONS = {"test": 0.2, "val": 0.1, "calib": 0.1}
DIGITS = "digits"
DIGITS_HARD = "digits-hard"
DIGITS_MEAN, DIGITS_STD = 0.5, 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Greyscale as (0.299 R + 0.587 G + 0.114 B): the ImageNet statistics of that mix
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = (0.458,), (0.226,)
# An image folder is decoded once into memory when its tensors fit in this many bytes
IN_MEMORY_LIMIT_BYTES = 256 << 20
_FORMS = (
    "'digits' (embedded demo set), 'digits-hard' (embedded benchmark set), "
    "'imagefolder:DIR' (DIR/<class>/<image>) or 'module:function'"
)


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
        return _load_imagefolder(spec.partition(":")[2], shape, seed)
    if is_callable_spec(spec):
        return _load_callable(spec, shape, seed)
    raise DataError(f"unknown data source '{spec}'; use {_FORMS}")


def _check_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise DataError(f"input shape must be (C, H, W) of positive sizes, got {input_shape}")
    return shape  # type: ignore[return-value]


def _check_channels(channels: int, source: str) -> None:
    if channels not in (1, 3):
        raise DataError(
            f"{source} gives 1 (greyscale) or 3 (RGB) channels, but input.shape asks for "
            f"{channels}; set input.shape to (1, H, W) or (3, H, W)"
        )


# --- splitting ---------------------------------------------------------------------------------


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


def _subset_splits(
    full: Dataset, indices: dict[str, list[int]], num_classes: int, record: dict[str, Any]
) -> Splits:
    parts = {name: Subset(full, indices[name]) for name in SPLIT_NAMES}
    record = {
        **record,
        "num_classes": num_classes,
        "sizes": {name: len(idx) for name, idx in indices.items()},
        "indices": indices,
    }
    return Splits(**parts, num_classes=num_classes, record=record)


def _split_record(seed: int, stratified: bool) -> dict[str, Any]:
    return {"seed": seed, "stratified": stratified, "split_fractions": dict(SPLIT_FRACTIONS)}


# --- digits ------------------------------------------------------------------------------------


def _load_digits(shape: tuple[int, int, int], seed: int) -> Splits:
    from sklearn.datasets import load_digits

    c, h, w = shape
    _check_channels(c, "digits")
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
        **_split_record(seed, stratified),
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
    return _subset_splits(TensorDataset(images, labels), indices, 10, record)


def _load_digits_hard(shape: tuple[int, int, int], seed: int) -> Splits:
    from pipeline.core.artifacts import default_cache_dir
    from pipeline.model import digits_hard

    _check_channels(shape[0], DIGITS_HARD)
    parts, record = digits_hard.load_cached(shape, seed, default_cache_dir())
    return Splits(**parts, num_classes=10, record=record)


# --- image folder ------------------------------------------------------------------------------


def _load_imagefolder(folder: str, shape: tuple[int, int, int], seed: int) -> Splits:
    if not folder:
        raise DataError("imagefolder: needs a folder, e.g. imagefolder:data/images")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (from imagefolder:{folder})")
    c, h, w = shape
    _check_channels(c, "imagefolder")
    dataset = _image_folder(root, shape)
    labels = np.asarray(dataset.targets)
    in_memory = len(labels) * c * h * w * 4 <= IN_MEMORY_LIMIT_BYTES
    full: Dataset = _decode_all(dataset) if in_memory else dataset
    indices, stratified = split_indices(labels, seed)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)
    record = {
        "source": f"imagefolder:{root.resolve()}",
        "classes": list(dataset.classes),
        "num_samples": len(labels),
        "files_sha256": _files_digest(dataset, root),
        "in_memory": in_memory,
        **_split_record(seed, stratified),
        "preprocessing": {
            "scale": "pixel / 255",
            "resize": [h, w],
            "interpolation": "bilinear (antialiased)",
            "channels": c,
            "channel_mode": "rgb" if c == 3 else "greyscale",
            "mean": list(mean),
            "std": list(std),
        },
    }
    return _subset_splits(full, indices, len(dataset.classes), record)


def _image_folder(root: Path, shape: tuple[int, int, int]) -> Any:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    c, h, w = shape
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)
    steps = [T.Resize((h, w))] + ([T.Grayscale(1)] if c == 1 else [])
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    try:
        dataset = ImageFolder(str(root), transform=transform)
    except FileNotFoundError as exc:  # no class folders, or class folders without images
        raise DataError(
            f"no images found in {root}: expected {root}/<class>/<image>.png (or .jpg, .jpeg, "
            ".bmp, .webp ...), one sub-folder per class"
        ) from exc
    if len(dataset.classes) < 2:
        raise DataError(
            f"{root} has one class folder ({dataset.classes[0]}); a classifier needs at least "
            "two: put each class's images in its own sub-folder"
        )
    return dataset


def _decode_all(dataset: Any) -> TensorDataset:
    """Decode every image once so training epochs do not re-read and re-resize files."""
    xs = []
    for i, (path, _) in enumerate(dataset.samples):
        try:
            xs.append(dataset[i][0])
        except Exception as exc:  # a corrupt or unreadable file: name it
            raise DataError(f"cannot read image {path}: {exc}") from exc
    return TensorDataset(torch.stack(xs), torch.as_tensor(dataset.targets, dtype=torch.long))


def _files_digest(dataset: Any, root: Path) -> str:
    """Hash of the (file, label) list: the split indices refer to this exact order."""
    digest = hashlib.sha256()
    for path, label in dataset.samples:
        digest.update(f"{Path(path).relative_to(root).as_posix()}\t{label}\n".encode())
    return digest.hexdigest()


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
    record = {"source": spec, "num_samples": len(labels), **_split_record(seed, stratified)}
    record["preprocessing"] = {"input_shape": list(shape), "by": spec}
    return _subset_splits(dataset, indices, int(labels.max()) + 1, record)


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
