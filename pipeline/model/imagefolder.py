"""The `imagefolder:DIR` data source: one sub-folder of images per class.

Images are resized and normalised with the ImageNet statistics (or their greyscale mix), and a
folder small enough is decoded once into memory, so training epochs do not re-read files. The
record hashes the (file, label) list, since the split indices refer to its exact order.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from pipeline.core.errors import DataError
from pipeline.model.image_scan import Scan, find_classes, scan_images
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
        "skipped_files": dataset.scan.record(),
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
    from torchvision.datasets.folder import IMG_EXTENSIONS

    class SafeImageFolder(ImageFolder):
        """torchvision's ImageFolder with the listing of `pipeline.model.image_scan`: each
        real file once, no walk around a link loop, what was left out counted."""

        def find_classes(self, directory: Any) -> tuple[list[str], dict[str, int]]:
            self.scan = Scan()
            classes = find_classes(Path(directory), self.scan)
            if not classes:
                raise FileNotFoundError(f"no class folders in {directory}")
            return classes, {name: i for i, name in enumerate(classes)}

        def make_dataset(self, directory: Any, class_to_idx: dict[str, int], *_: Any, **__: Any):
            found = scan_images(Path(directory), list(class_to_idx), IMG_EXTENSIONS)
            found.skipped.update(self.scan.skipped)
            self.scan = found
            _check_every_class_has_images(Path(directory), class_to_idx, found)
            return found.samples

    c, h, w = shape
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)
    steps = [T.Resize((h, w))] + ([T.Grayscale(1)] if c == 1 else [])
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    try:
        dataset = SafeImageFolder(str(root), transform=transform)
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


def _check_every_class_has_images(root: Path, class_to_idx: dict[str, int], scan: Scan) -> None:
    """A class whose every file was left out (say, a link to another class's folder) would
    silently shift the labels: refuse it, naming it."""
    if not scan.samples:
        raise FileNotFoundError(f"no images in {root}")
    counts = Counter(label for _, label in scan.samples)
    empty = [name for name, i in class_to_idx.items() if counts[i] == 0]
    if empty:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(scan.skipped.items()))
        raise DataError(
            f"class folder {root / empty[0]} has no images of its own"
            + (f" (left out: {skipped})" if skipped else "")
            + "; give each class its own images, or remove the folder"
        )


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
