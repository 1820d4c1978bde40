"""Image folders with symbolic links: a loop is walked once, a file reached twice counts once,
so no image can be in two splits; what was left out is counted in the data record (which is
the manifest's `data`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.model.data import load_data

CLASSES = ("cat", "dog")
PER_CLASS = 8


def write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            pixels[..., label] = 255
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def load(root: Path):
    return load_data(f"imagefolder:{root}", (3, 8, 8), seed=0)


def every_index(splits) -> list[int]:
    return [i for idx in splits.record["indices"].values() for i in idx]


def test_a_link_loop_is_walked_once(tmp_path) -> None:
    root = tmp_path / "imgs"
    write_images(root)
    os.symlink("..", root / "cat" / "up")  # cat/up/cat/up/... back to the root
    os.symlink(".", root / "dog" / "again")  # dog/again/again/... to itself
    splits = load(root)
    assert splits.record["num_samples"] == 2 * PER_CLASS
    assert sorted(every_index(splits)) == list(range(2 * PER_CLASS))  # each image in one split
    skipped = splits.record["skipped_files"]
    assert skipped["by_reason"]["folder reached twice (a link loop or a second link)"] >= 2


def test_a_file_reached_twice_counts_once_and_is_recorded(tmp_path) -> None:
    root = tmp_path / "imgs"
    write_images(root)
    os.symlink(root / "cat" / "0.png", root / "cat" / "0-again.png")
    (root / "dog" / "more").mkdir()
    os.symlink(root / "dog" / "1.png", root / "dog" / "more" / "1.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    os.symlink("nowhere.png", root / "dog" / "broken.png")
    os.symlink("self.png", root / "dog" / "self.png")
    splits = load(root)
    assert splits.record["num_samples"] == 2 * PER_CLASS
    assert splits.record["skipped_files"] == {
        "total": 5,
        "by_reason": {
            "broken link or vanished file": 1,
            "duplicate (the same file reached twice)": 2,
            "not an image (file extension)": 1,
            "symbolic link loop": 1,
        },
    }


def test_a_clean_folder_records_nothing_skipped(tmp_path) -> None:
    write_images(tmp_path / "imgs")
    record = load(tmp_path / "imgs").record
    assert record["skipped_files"] == {"total": 0, "by_reason": {}}


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path) -> None:
    root = tmp_path / "imgs"
    write_images(root)
    os.symlink("cat", root / "kitten")  # the same images under a second label
    with pytest.raises(DataError, match="kitten has no images of its own"):
        load(root)


def test_a_link_loop_among_the_class_folders_is_left_out(tmp_path) -> None:
    root = tmp_path / "imgs"
    write_images(root)
    os.symlink("loop", root / "loop")
    splits = load(root)
    assert splits.record["classes"] == list(CLASSES)
    assert splits.record["skipped_files"]["by_reason"] == {"symbolic link loop": 1}


def test_without_links_the_files_come_in_torchvisions_order(tmp_path) -> None:
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from pipeline.model.image_scan import scan_images

    root = tmp_path / "imgs"
    write_images(root)
    for sub in ("a", "a-b", "a/x", "B"):  # '-' sorts before '/': not a depth-first order
        (root / "cat" / sub).mkdir()
        Image.new("RGB", (4, 4)).save(root / "cat" / sub / "img.png")
    classes = list(CLASSES)
    listed = scan_images(root, classes, IMG_EXTENSIONS).samples
    assert listed == ImageFolder(str(root)).samples
