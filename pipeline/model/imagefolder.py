"""The `imagefolder:DIR` data source: one sub-folder of images per class.

Images are resized and normalised with the ImageNet statistics (or their greyscale mix), and a
folder small enough is decoded once into memory, so training epochs do not re-read files. The
record hashes the (file, label) list, since the split indices refer to its exact order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from pipeline.core.errors import DataError
from pipeline.model.splits import Splits, check_channels, split_indices, split_record, subset_splits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Greyscale as (0.299 R + 0.587 G + 0.114 B): the ImageNet statistics of that mix
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = (0.458,), (0.226,)
# An image folder is decoded once into memory when its tensors fit in this many bytes
IN_MEMORY_LIMIT_BYTES = 256 << 20


def load_imagefolder(folder: str, shape: tuple[int, int, int], seed: int) -> Splits:
    """The splits of `folder` (FOLDER/<class>/<image>), images converted to `shape` (C, H, W)."""
    if not folder:
        raise DataError("imagefolder: needs a folder, e.g. imagefolder:data/images")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (from imagefolder:{folder})")
    c, h, w = shape
    check_channels(c, "imagefolder")
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
        **split_record(seed, stratified),
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
    return subset_splits(full, indices, len(dataset.classes), record)


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
