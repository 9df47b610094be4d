"""A disk cache of images' regions, so a picture seen before costs a file read, not an extraction."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from adapt.io import atomic_write, delete_oldest
from adapt.regions import Regions, comparable_identity


class RegionCache:
    """Regions of images on disk, keyed by the decoded pixels and the extractor identity (the
    fields of it that :func:`~adapt.regions.check_extractor` compares).

    Re-adding the same picture (any file name or format that decodes to the same pixels) costs a
    file read, not a detector and backbone pass.

    Args:
        folder: the cache's root (one sub-folder per extractor identity).
        identity: the extractor's identity.
        max_bytes: keep the files of this identity under this many bytes: after each write the least
            recently used files (oldest modification time; a hit touches its file) are deleted
            until the rest fit. ``None``: unbounded.
    """

    def __init__(self, folder: str | Path, identity: dict, max_bytes: int | None = None) -> None:
        digest = hashlib.sha256(json.dumps(comparable_identity(identity), sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(folder) / digest
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    @staticmethod
    def key(image: Image.Image) -> str:
        """Content key of an RGB image."""
        h = hashlib.sha256(f"{image.size}".encode())
        h.update(image.tobytes())
        return h.hexdigest()[:32]

    def get(self, key: str) -> Regions | None:
        """The cached regions of ``key``, or ``None`` when absent or unreadable (then removed)."""
        path = self.folder / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            os.utime(path)  # a hit is a use: the least recently used files are trimmed first
            with np.load(path, allow_pickle=False) as data:
                return Regions(boxes=data["boxes"], features=data["features"],
                               labels=[str(x) for x in data["labels"]], scores=data["scores"],
                               is_fill=data["is_fill"], image_size=tuple(int(x) for x in data["image_size"]))
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
            # A damaged file (cut short by a full disk, or written by hand): a miss, recomputed.
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, regions: Regions) -> None:
        """Store the regions of ``key``, replacing the file atomically."""
        atomic_write(self.folder / f"{key}.npz", lambda tmp: np.savez(
            tmp, boxes=regions.boxes, features=regions.features, labels=np.array(regions.labels, dtype=str),
            scores=regions.scores, is_fill=regions.is_fill, image_size=np.array(regions.image_size)))
        if self.max_bytes is not None:
            self.trim(self.max_bytes)

    def trim(self, max_bytes: int) -> None:
        """Delete the least recently used files until the rest take at most ``max_bytes``."""
        delete_oldest((entry.path for entry in os.scandir(self.folder)
                       if entry.name.endswith(".npz") and entry.is_file()), max_bytes)
