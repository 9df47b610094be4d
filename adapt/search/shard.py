"""Storage of a gallery index: self-contained, memory-mapped shards.

An index is a folder::

    manifest.json        model fingerprint, first_stage (the kind of first-stage vectors), n_regions,
                         shard_size, shards and row counts
    shard-00000/
        regions.npy      (shard_size, n_regions, d) float16: encoded regions, memory-mapped
        boxes.npy        (shard_size, n_regions, 4) float32: region boxes, NaN where not given
        ids.json         the image ids, in row order
        details.jsonl    one JSON line per row: what the app shows of a hit (ImageDetails), or null
        ann.faiss        the shard's FAISS index: its first-stage image vectors (read into RAM);
                         absent when the first stage is a Qdrant collection (adapt.search.qdrant)
    shard-00001/ ...

The arrays are preallocated to ``shard_size`` rows when a shard is opened (sparse on disk until
written) and only the first ``count`` rows, as recorded in the manifest, are valid; :meth:`Shard.trim`
cuts them to those rows (for copying the index: a copy carries the holes in full) and the next
append extends them again. ``add`` writes
into the last shard and starts a new one when it is full; full shards are never written again, so
adding images never rebuilds the existing index. The manifest is replaced last and atomically, so
an interrupted ``add`` leaves the index as it was before it (a FAISS file that ran ahead of the
manifest is cut back on open, and details lines beyond it are cut before the next append).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import torch

from adapt.io import atomic_write, atomic_write_json, resize_npy
from adapt.model import AdaptModel
from adapt.regions import FILL_LABEL, Regions
from adapt.search.candidates import VectorKind, ann_queries, build_ann, extend_ann, pool_size, rescore


class GalleryIndexError(RuntimeError):
    """An index that cannot be created, opened or used as asked (clear reason in the message)."""


def _write_ann(path: Path, index: faiss.Index) -> None:
    atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))


@dataclass
class ImageDetails:
    """What an index keeps of an image to show it as a hit, beside its boxes.

    Attributes:
        labels: the regions' detector labels.
        scores: the regions' detector scores.
        is_fill: per region, whether it is a fill rather than a detection.
        image_size: ``(width, height)`` of the image the boxes are in.
        source: a file showing the image: relative to the index folder (a thumbnail the index
            holds) or absolute (the original), or ``None``.
    """

    labels: list[str]
    scores: list[float]
    is_fill: list[bool]
    image_size: tuple[int, int]
    source: str | None = None

    @classmethod
    def of(cls, regions: Regions, source: str | None = None) -> "ImageDetails":
        """The details of extracted ``regions``."""
        return cls(list(regions.labels), [round(float(s), 4) for s in regions.scores],
                   [bool(f) for f in regions.is_fill], (int(regions.image_size[0]), int(regions.image_size[1])),
                   source)

    def regions(self, boxes: np.ndarray) -> Regions:
        """The hit's :class:`Regions` with these ``boxes`` (NaN ones, never given, become
        zero-size) and no features (``(k, 0)``)."""
        return Regions(boxes=np.nan_to_num(boxes), features=np.zeros((len(boxes), 0), np.float32), labels=list(self.labels),
                       scores=np.asarray(self.scores, np.float32), is_fill=np.asarray(self.is_fill, bool),
                       image_size=tuple(self.image_size))



def boxes_only(boxes: np.ndarray) -> Regions:
    """:class:`Regions` of an image added without details: its boxes only (NaN ones become
    zero-size), unlabelled, no features, its size the boxes' extent."""
    boxes = np.nan_to_num(boxes)
    size = (max(1, int(np.ceil(boxes[:, 2].max(initial=1)))), max(1, int(np.ceil(boxes[:, 3].max(initial=1)))))
    return Regions(boxes=boxes, features=np.zeros((len(boxes), 0), np.float32), labels=[FILL_LABEL] * len(boxes),
                   scores=np.zeros(len(boxes), np.float32), is_fill=np.zeros(len(boxes), bool), image_size=size)


class Shard:
    """One self-contained part of a gallery: its arrays (memory-mapped) and its FAISS index.

    Attributes:
        folder: where it lives.
        count: valid rows.
        capacity: rows it can hold (the index's ``shard_size``).
        regions: ``(count, n_regions, d)`` float16 memmap of encoded regions.
        boxes: ``(count, n_regions, 4)`` float32 memmap.
        ids: ``count`` image ids.
        ann: the FAISS index holding the ``count`` first-stage image vectors, or ``None`` when the
            index's first stage lives elsewhere (a Qdrant collection).
    """

    def __init__(self, folder: Path, count: int, capacity: int, with_ann: bool = True) -> None:
        self.folder = folder
        self.capacity = capacity
        self.count = count
        try:
            self._files = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                           for name in ("regions", "boxes")}
            self.ids: list[str] = json.loads((folder / "ids.json").read_text())[:count]
            lines = (folder / "details.jsonl").read_bytes().splitlines(keepends=True)[:count]
            self.ann = faiss.read_index(str(folder / "ann.faiss")) if with_ann else None
        except (OSError, ValueError, RuntimeError) as e:
            raise GalleryIndexError(f"shard {folder} is missing or unreadable ({e}); the index is "
                                    "damaged: rebuild it with GalleryIndex.create") from e
        self._details = lines
        self._details_bytes = sum(len(line) for line in lines)
        if (len(self.ids) != count or len(lines) != count or (self.ann is not None and self.ann.ntotal < count)
                or any(not count <= len(a) <= capacity for a in self._files.values())):
            raise GalleryIndexError(f"shard {folder} does not match the manifest ({count} rows of "
                                    f"{capacity}); the index is damaged: rebuild it")
        if self.ann is not None and self.ann.ntotal > count:  # an add died after the FAISS file was replaced
            self.ann = build_ann(self.ann.reconstruct_n(0, count))

    @property
    def regions(self) -> np.ndarray:
        return self._files["regions"][: self.count]

    @property
    def boxes(self) -> np.ndarray:
        return self._files["boxes"][: self.count]

    def details(self, row: int) -> ImageDetails | None:
        """What was stored to show image ``row`` (``None`` when it was added without)."""
        data = json.loads(self._details[row])
        return None if data is None else ImageDetails(**data)

    @classmethod
    def allocate(
        cls, folder: Path, capacity: int, n_regions: int, latent_size: int, vector_size: int | None
    ) -> "Shard":
        """Create an empty shard whose arrays hold ``capacity`` rows (``vector_size``: of its FAISS
        index; ``None`` for a shard without one)."""
        # A folder left by an add() that died before the manifest listed it is reused.
        folder.mkdir(parents=True, exist_ok=True)
        shapes = {"regions": ((capacity, n_regions, latent_size), np.float16),
                  "boxes": ((capacity, n_regions, 4), np.float32)}
        for name, (shape, dtype) in shapes.items():
            # open_memmap only extends the file to its full size: sparse until rows are written.
            path = folder / f"{name}.npy"
            np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
        atomic_write_json(folder / "ids.json", [])
        (folder / "details.jsonl").write_bytes(b"")
        if vector_size is not None:
            _write_ann(folder / "ann.faiss", faiss.IndexFlatIP(vector_size))
        return cls(folder, 0, capacity, with_ann=vector_size is not None)

    def append(
        self, regions: np.ndarray, vectors: np.ndarray | None, boxes: np.ndarray, ids: list[str],
        details: Sequence[ImageDetails | None],
    ) -> None:
        """Append ``n`` images: encoded ``regions (n, n_regions, d)``, first-stage ``vectors
        (n, dim)`` float32 (for the shard's FAISS index, if it has one), ``boxes (n, n_regions, 4)``,
        their ids and details.

        The arrays and details are written in place; the FAISS index and ids are saved by :meth:`save`.
        """
        start, stop = self.count, self.count + len(ids)
        if any(len(a) < stop for a in self._files.values()):
            self._resize(self.capacity)
        for name, values in (("regions", regions.astype(np.float16)), ("boxes", boxes)):
            out = np.load(self.folder / f"{name}.npy", mmap_mode="r+")
            out[start:stop] = values
            out.flush()
        lines = [(json.dumps(None if d is None else asdict(d)) + "\n").encode() for d in details]
        with open(self.folder / "details.jsonl", "r+b") as file:
            file.truncate(self._details_bytes)  # lines an interrupted add wrote beyond the manifest
            file.seek(self._details_bytes)
            file.write(b"".join(lines))
            file.flush()
            os.fsync(file.fileno())
        self._details += lines
        self._details_bytes += sum(len(line) for line in lines)
        self.ids.extend(ids)
        self.count = stop
        if self.ann is not None:
            self.ann = extend_ann(self.ann, vectors)

    def trim(self) -> None:
        """Cut the arrays' files to the valid rows."""
        self._resize(self.count)

    def _resize(self, rows: int) -> None:
        self._files = {}  # no memory map may outlive the file it maps
        for name in ("regions", "boxes"):
            resize_npy(self.folder / f"{name}.npy", rows)
        self._files = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ("regions", "boxes")}

    def save(self) -> None:
        """Persist the ids and the FAISS index (the arrays and details are already on disk)."""
        atomic_write_json(self.folder / "ids.json", self.ids)
        if self.ann is not None:
            _write_ann(self.folder / "ann.faiss", self.ann)

    def candidates(
        self, kind: VectorKind, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """This shard's ``k`` best images for each caption by first-stage score.

        Args:
            kind: the index's kind of first-stage vectors.
            queries: ``(n_captions, qdim)`` from :func:`caption_queries`.

        Returns:
            ``scores (n_captions, k')`` and ``rows (n_captions, k')``, best first (``-1``: no hit).
        """
        _, rows = self.ann.search(ann_queries(kind, queries), min(self.count, pool_size(kind, k)))
        found = [r[r >= 0] for r in rows]
        return rescore(kind, queries, found, [self.ann.reconstruct_batch(f) for f in found], k)

    def _prefetch(self, rows: np.ndarray) -> None:
        """Ask the kernel to read these rows' regions now, all at once: when the gallery does not
        fit in the page cache, the missing rows then cost about one disk round trip together
        instead of one each as the memmap faults them in."""
        if not hasattr(os, "posix_fadvise"):  # not on macOS or Windows
            return
        regions = self._files["regions"]
        row_bytes = regions[0].nbytes
        fd = os.open(regions.filename, os.O_RDONLY)
        try:
            for row in rows:
                start = regions.offset + int(row) * row_bytes
                os.posix_fadvise(fd, start, row_bytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def exact_scores(
        self,
        model: AdaptModel,
        rows: np.ndarray | slice,
        words: torch.Tensor,
        mask: torch.Tensor,
        directions: tuple[str, ...] | None,
    ) -> np.ndarray:
        """ADAPT scores ``(len(rows), n_captions)`` of the given rows against encoded captions."""
        if not isinstance(rows, slice):
            self._prefetch(rows)
        picked = self.regions[rows]  # fancy indexing reads a copy; a slice is a read-only view
        # torch converts float16 to float32 faster than numpy does.
        half = torch.from_numpy(picked if picked.flags.writeable else np.array(picked))
        regions = half.to(model.device, torch.float32)
        return model.similarity(regions, words, mask, directions=directions).scores.float().cpu().numpy()
