"""Listing an image folder's files: each real file once, never around a symbolic-link loop.

A folder reached twice (a link back to a parent, two links to one place) is walked once, and a
file reached by two paths counts once: otherwise one image can land in both train and test,
and a link loop multiplies the data set until the kernel gives up. Every file left out is
counted by reason, for the run's manifest.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import DataError

# Why a file or folder was left out (the keys of the manifest's `skipped_files`)
NOT_AN_IMAGE = "not an image (file extension)"
DUPLICATE = "duplicate (the same file reached twice)"
FOLDER_TWICE = "folder reached twice (a link loop or a second link)"
LINK_LOOP = "symbolic link loop"
BROKEN = "broken link or vanished file"
UNREADABLE = "unreadable (permissions)"
NOT_REGULAR = "not a regular file"


@dataclass
class Scan:
    """The (file, class index) samples found, in a stable order, and what was left out."""

    samples: list[tuple[str, int]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def record(self) -> dict[str, object]:
        return {
            "total": sum(self.skipped.values()),
            "by_reason": dict(sorted(self.skipped.items())),
        }


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return LINK_LOOP
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UNREADABLE
    return BROKEN


def find_classes(root: Path, scan: Scan) -> list[str]:
    """Sub-folders of `root` (links followed), sorted; entries that cannot be read are skipped."""
    classes = []
    try:
        entries = list(os.scandir(root))
    except OSError as exc:
        raise DataError(f"cannot list the data folder {root}: {exc.strerror}") from None
    for entry in entries:
        try:
            if entry.is_dir():
                classes.append(entry.name)
        except OSError as exc:  # a link loop or a link into an unreadable place
            scan.skipped[_os_reason(exc)] += 1
    return sorted(classes)


def scan_images(root: Path, classes: list[str], extensions: tuple[str, ...]) -> Scan:
    """Every image under `root/<class>/` (any depth), each real file and folder once."""
    scan = Scan()
    # The root and every class folder are reserved up front: a link back to one of them from
    # inside a class (a loop, or another class's images) is never walked
    reserved = (_identity(root / name) for name in ("", *classes))
    seen_dirs: set[tuple[int, int]] = {ident for ident in reserved if ident is not None}
    seen_files: set[str] = set()
    for index, name in enumerate(classes):
        # In torchvision's order (folders sorted by path), so splits stay as they were
        for folder, filenames in sorted(_walk(root / name, seen_dirs, scan)):
            for fname in sorted(filenames):
                path = os.path.join(folder, fname)
                reason = _file_reason(path, extensions, seen_files)
                if reason:
                    scan.skipped[reason] += 1
                else:
                    scan.samples.append((path, index))
    return scan


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _walk(
    top: Path, seen_dirs: set[tuple[int, int]], scan: Scan
) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) of os.walk from `top` following links, pruned to sub-folders not
    walked before (by device and inode)."""

    def unreadable(exc: OSError) -> None:  # a folder that cannot be listed
        scan.skipped[_os_reason(exc)] += 1

    for folder, dirnames, filenames in os.walk(top, onerror=unreadable, followlinks=True):
        kept = []
        for d in sorted(dirnames):
            try:
                sub = os.stat(os.path.join(folder, d))
            except OSError as exc:
                scan.skipped[_os_reason(exc)] += 1
                continue
            if (sub.st_dev, sub.st_ino) in seen_dirs:
                scan.skipped[FOLDER_TWICE] += 1
                continue
            seen_dirs.add((sub.st_dev, sub.st_ino))
            kept.append(d)
        dirnames[:] = kept  # os.walk descends only into these, in this order
        yield folder, filenames


def _file_reason(path: str, extensions: tuple[str, ...], seen: set[str]) -> str | None:
    """Why `path` is left out, or None when it is a new image; a kept file joins `seen`."""
    if not path.lower().endswith(extensions):
        return NOT_AN_IMAGE
    try:
        info = os.stat(path)
    except OSError as exc:
        return _os_reason(exc)
    if not stat.S_ISREG(info.st_mode):
        return NOT_REGULAR
    if not os.access(path, os.R_OK):
        return UNREADABLE
    real = os.path.realpath(path)
    if real in seen:
        return DUPLICATE
    seen.add(real)
    return None
