"""Build or grow a gallery index (:class:`adapt.search.GalleryIndex`) that ``python app.py
--gallery INDEX`` serves.

Usage::

    python -m training.index --images DIR --out INDEX [--captions FILE [--split test]]
    python -m training.index --features DIR [--split test] [--images DIR] --out INDEX
        [--checkpoint CKPT] [--thumbnail-size 384] [--batch-size 8] [--commit-every 64]
        [--qdrant LOCATION [--qdrant-collection NAME]] [--shard-size N]

``--images DIR``: every image file under ``DIR`` (recursively, by suffix), or with ``--captions``
those of a captions file (a Karpathy-style JSON, CSV or JSONL as ``training.extract`` reads,
``--split`` picking one split), is extracted with the model's own region extractor. ``--features
DIR``: an extracted / precomp folder (``training.extract`` output, or SCAN / VSE precomp files)
is indexed as it is: ``{split}_ims.npy`` and, when present, ``{split}_boxes.npy``,
``{split}_ids.txt`` (the image paths; else rows are ``{split}/{row}``) and ``extractor.json``
(refused when it is not the model's extractor); ``--images`` then names the folder of the images,
for thumbnails.

An image's id is its path relative to ``DIR``. Per image the index stores what the app shows of a
hit: its boxes, detector labels and scores, its size and a JPEG thumbnail (``--thumbnail-size``
pixels on its longer side, in ``INDEX/thumbnails``; 0: the original's absolute path instead), so
an index folder is self-contained: copy it into a Space and serve it.

Resuming and growing: images are added ``--commit-every`` at a time, each add committed
atomically (:meth:`GalleryIndex.add`), so rerunning the same command after a crash or Ctrl-C skips
the images the index holds and adds the rest: nothing is lost or added twice. Rerunning it on a
folder with new images adds the new ones. At the end the shards' files are cut to the images they
hold (:meth:`GalleryIndex.trim`), so the folder is as large as its content. Unreadable files are reported, listed in
``INDEX/skipped.txt`` and skipped (and tried again by the next run).

``--qdrant LOCATION`` (a new index only): its first stage is a Qdrant collection instead of FAISS
(``pip install "adapt[qdrant]"``): a server URL, or a folder for an embedded collection (relative:
inside ``INDEX``); see :mod:`adapt.search.qdrant`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

# As in training.extract: OpenMP threads that busy-wait slow torch down on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from adapt.model import AdaptModel, CheckpointError  # noqa: E402
from adapt.pipeline import Retriever  # noqa: E402
from adapt.device import pick_device  # noqa: E402
from adapt.regions import (  # noqa: E402
    ExtractorError,
    ExtractorMismatchError,
    ImageError,
    check_extractor,
    load_image,
    shrink_to_max_side,
)
from adapt.search import DEFAULT_SHARD_SIZE, GalleryIndex, GalleryIndexError, ImageDetails, QdrantFirstStage  # noqa: E402
from checkpoints import DEFAULT_CHECKPOINT  # noqa: E402
from training.data import DatasetError, load_image_rows, read_extractor  # noqa: E402
from training.extract import ExtractError, read_records  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
THUMBNAILS = "thumbnails"
SKIPPED = "skipped.txt"


class IndexBuildError(ValueError):
    """Inputs an index cannot be built from; the message says what to do."""


@dataclass
class Pending:
    """Images extracted but not yet added to the index."""

    features: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    details: list[ImageDetails] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, key: str, features: np.ndarray, boxes: np.ndarray, details: ImageDetails) -> None:
        self.features.append(features)
        self.boxes.append(boxes)
        self.ids.append(key)
        self.details.append(details)

    def commit(self, index: GalleryIndex) -> None:
        """Add the pending images to ``index`` in one atomic add, and forget them."""
        if self.ids:
            index.add(np.stack(self.features), np.stack(self.boxes), self.ids, self.details)
        for values in (self.features, self.boxes, self.ids, self.details):
            values.clear()


def image_files(folder: Path) -> list[str]:
    """Paths (relative, POSIX) of the image files under ``folder``, sorted."""
    if not folder.is_dir():
        raise IndexBuildError(f"--images {folder} is not a folder")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def captioned_images(captions: Path, split: str | None) -> list[str]:
    """The images of a captions file (of one ``split``), in its order, each once."""
    records = read_records(captions)
    if split is not None:
        records = [r for r in records if r.split == split]
        if not records:
            raise IndexBuildError(f"{captions} lists no images of split {split!r}")
    return list(dict.fromkeys(r.image for r in records))


def thumbnail(index_folder: Path, key: str, image: Image.Image, max_side: int) -> str:
    """Write the JPEG thumbnail of image ``key`` into the index; returns its path relative to it."""
    name = f"{THUMBNAILS}/{hashlib.sha256(key.encode()).hexdigest()[:24]}.jpg"
    path = index_folder / name
    path.parent.mkdir(exist_ok=True)
    shrink_to_max_side(image, max_side).save(path, "JPEG", quality=85)
    return name


def shown_as(index_folder: Path, key: str, path: Path, image: Image.Image, thumbnail_size: int) -> str:
    """What a hit shows for the image: its thumbnail in the index, or the original's absolute path."""
    return thumbnail(index_folder, key, image, thumbnail_size) if thumbnail_size else str(path.resolve())


class Builder:
    """Adds images to an index in atomic commits, with a progress bar and a list of skipped files.

    Args:
        index: the index to grow.
        total: images of the run.
        done: those of them the index holds already.
        commit_every: images per :meth:`GalleryIndex.add`.
    """

    def __init__(self, index: GalleryIndex, total: int, done: int, commit_every: int) -> None:
        self.index = index
        self.commit_every = commit_every
        self.pending = Pending()
        self.added = 0
        self.skipped: list[tuple[str, str]] = []
        self.bar = tqdm(total=total, initial=done, unit="img", desc="indexing", dynamic_ncols=True)

    def add(self, key: str, features: np.ndarray, boxes: np.ndarray, details: ImageDetails) -> None:
        self.pending.append(key, features, boxes, details)
        self.bar.update(1)
        if len(self.pending) >= self.commit_every:
            self.commit()

    def skip(self, key: str, reason: str) -> None:
        reason = " ".join(reason.split())
        tqdm.write(f"skipping {key}: {reason}", file=sys.stderr)
        self.skipped.append((key, reason))
        self.bar.update(1)

    def commit(self) -> None:
        self.added += len(self.pending)
        self.pending.commit(self.index)

    def finish(self) -> None:
        """Commit the rest, cut the index's files to its images, write ``skipped.txt`` and print a summary."""
        self.commit()
        self.index.trim()
        self.bar.close()
        (self.index.folder / SKIPPED).write_text("".join(f"{k}\t{r}\n" for k, r in self.skipped), encoding="utf-8")
        print(f"{self.index.folder}: {len(self.index)} images ({self.added} added now), {len(self.skipped)} skipped"
              + (f" (listed in {SKIPPED})" if self.skipped else ""), file=sys.stderr)


def index_images(
    index: GalleryIndex, retriever: Retriever, images_dir: Path, keys: Sequence[str],
    batch_size: int = 8, commit_every: int = 64, thumbnail_size: int = 384,
) -> Builder:
    """Extract (with ``retriever``'s extractor) and add the images ``keys`` (paths relative to
    ``images_dir``) the index lacks."""
    fewest, most = retriever.extractor.regions_per_image
    if fewest != most:
        raise IndexBuildError(f"{retriever.extractor.name} gives images {fewest} to {most} regions; an index holds "
                              "a fixed number per image")
    todo = [k for k in keys if k not in index]
    builder = Builder(index, len(keys), len(keys) - len(todo), commit_every)
    for file in retriever.extract_files([images_dir / key for key in todo], names=todo, batch_size=batch_size):
        if file.problem is not None:
            builder.skip(file.name, str(file.problem))
            continue
        source = shown_as(index.folder, file.name, file.path, file.image, thumbnail_size)
        builder.add(file.name, file.regions.features, file.regions.boxes, ImageDetails.of(file.regions, source))
    builder.finish()
    return builder


def _precomp_rows(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray | None, list[str], dict[str, Any] | None]:
    """The features, boxes, ids (``{split}/{row}`` when the folder has none) and extractor identity
    of a precomp ``folder``'s ``split``, read as training reads them."""
    try:
        rows = load_image_rows(folder, split)
        identity = read_extractor(folder)
    except DatasetError as e:
        raise IndexBuildError(f"--features {e}") from e
    ids = rows.ids if rows.ids is not None else [f"{split}/{row}" for row in range(len(rows.features))]
    return rows.features, rows.boxes, ids, identity


def index_features(
    index: GalleryIndex, folder: Path, split: str, images_dir: Path | None = None,
    commit_every: int = 64, thumbnail_size: int = 384,
) -> Builder:
    """Add the rows of an extracted / precomp ``folder``'s ``split`` the index lacks."""
    features, boxes, ids, identity = _precomp_rows(folder, split)
    if identity is not None:
        try:
            check_extractor(index.model.config.extractor, identity, names=("model", "features"))
        except ExtractorMismatchError as e:
            raise IndexBuildError(f"--features {folder}: {e}") from e
    todo = [row for row, key in enumerate(ids) if key not in index]
    builder = Builder(index, len(ids), len(ids) - len(todo), commit_every)
    for row in todo:
        row_boxes = (np.full((features.shape[1], 4), np.nan, np.float32) if boxes is None
                     else np.asarray(boxes[row], np.float32))
        details = None
        if images_dir is not None:
            try:
                image = load_image(images_dir / ids[row], name=ids[row])
            except ImageError as e:
                builder.skip(ids[row], str(e))
                continue
            labels = [""] * len(row_boxes)
            details = ImageDetails(labels, [0.0] * len(labels), [False] * len(labels), image.size,
                                   shown_as(index.folder, ids[row], images_dir / ids[row], image, thumbnail_size))
        builder.add(ids[row], np.asarray(features[row], np.float32), row_boxes, details)
    builder.finish()
    return builder


def open_or_create(
    out: Path, model: AdaptModel, shard_size: int, qdrant: str | None, collection: str | None,
) -> GalleryIndex:
    """The index in ``out`` to grow, or a new one (with a Qdrant first stage when asked)."""
    if (out / "manifest.json").exists():
        index = GalleryIndex.open(out, model)
        backend = "faiss" if index.qdrant is None else "qdrant"
        if qdrant is not None and backend != "qdrant":
            raise IndexBuildError(f"{out} holds an index whose first stage is {backend}; --qdrant applies to "
                                  "a new index only")
        return index
    first_stage = None if qdrant is None else QdrantFirstStage.connect(qdrant, collection or f"adapt-{out.name}",
                                                                       out)
    return GalleryIndex.create(out, model, shard_size=shard_size, qdrant=first_stage)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, help="an extracted / precomp folder to index as it is")
    parser.add_argument("--images", type=Path, help="folder of images (with --features: for thumbnails)")
    parser.add_argument("--captions", type=Path, help="index the images of this captions file only")
    parser.add_argument("--split", help="the split of --captions (default: all) or of --features (default: test)")
    parser.add_argument("--out", required=True, type=Path, help="the index folder (created or grown)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="the model the index is for (default: the bundled one)")
    parser.add_argument("--thumbnail-size", type=int, default=384,
                        help="longer side of the stored thumbnails; 0 stores the images' paths instead")
    parser.add_argument("--batch-size", type=int, default=8, help="images per extraction call")
    parser.add_argument("--commit-every", type=int, default=64, help="images per atomic add to the index")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard (new index)")
    parser.add_argument("--qdrant", help="new index: first stage in Qdrant (server URL or embedded folder)")
    parser.add_argument("--qdrant-collection", help="its collection (default: adapt-<index folder name>)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    return parser


def _keys(args: argparse.Namespace) -> Iterator[str]:
    if args.captions is not None:
        yield from captioned_images(args.captions, args.split)
    else:
        yield from image_files(args.images)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.features is None and args.images is None:
        parser.error("pass --images DIR or --features DIR")
    if args.features is not None and args.captions is not None:
        parser.error("--captions selects images to extract; a --features folder is indexed as it is")
    try:
        model = AdaptModel.from_pretrained(args.checkpoint, map_location=str(args.device or pick_device()))
        index = open_or_create(args.out, model, args.shard_size, args.qdrant, args.qdrant_collection)
        try:
            if args.features is not None:
                index_features(index, args.features, args.split or "test", args.images, args.commit_every,
                               args.thumbnail_size)
            else:
                if model.config.extractor is None:
                    raise IndexBuildError(f"{args.checkpoint} does not name the region extractor of its training "
                                          "features, so images cannot be extracted for it: index --features")
                keys = list(_keys(args))
                index_images(index, Retriever(model), args.images, keys, args.batch_size, args.commit_every,
                             args.thumbnail_size)
        finally:
            index.close()
    except (IndexBuildError, GalleryIndexError, ExtractError, ExtractorError, ExtractorMismatchError,
            CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
