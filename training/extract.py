"""Extract region features of an image-caption dataset into the precomp layout, keeping the boxes.

Usage::

    python -m training.extract --images IMAGES_DIR --captions CAPTIONS --out OUT_DIR
        [--splits train dev test] [--extractor ssd-mobilenet-v2+efficientnet-lite0]
        [--num-regions 36] [--with-geometry] [--with-labels] [--whole-image] [--batch-size 8] [--captions-per-image 5]
        [--weights FILE | --weights-repo ORG/NAME [--weights-file FILE]] [--restart]

``--extractor bottom-up-attention`` gives the paper's features (the SCAN / VSE precomp files' 36 x
2048); its weights default to the published ``unc-nlp/frcnn-vg-finetuned`` (fetched once, 250 MB).

``CAPTIONS`` is either

- a Karpathy-style JSON file (Flickr30k / COCO): ``{"images": [{"filename", "split", "sentences":
  [{"raw": ...}, ...], "filepath" (optional)}]}``; split ``val`` is written as ``dev`` and COCO's
  ``restval`` joins ``train``, as in the SCAN / VSE++ precomp files; or
- a CSV (header) or JSONL file with the columns ``image``, ``caption`` and optionally ``split``
  (default ``--default-split``): one row per caption; the rows of an image need not be adjacent.

Images are paths relative to ``IMAGES_DIR``. Every image keeps its first ``--captions-per-image``
(5) non-empty captions; an image with fewer is skipped, like an unreadable one.

Written to ``OUT_DIR``, per split (in input order, skipped images left out, no holes):

=========================  ===========================================================================
``{split}_ims.npy``        ``(N, k, D)`` float32 region features (memory-mapped while written)
``{split}_boxes.npy``      ``(N, k, 4)`` float32 boxes ``x1, y1, x2, y2`` in pixels of the image
``{split}_caps.txt``       ``captions-per-image`` lines per image, in image order
``{split}_ids.txt``        one line per image: its path relative to IMAGES_DIR, URL-quoted
                           (``urllib.parse.unquote`` gives it back) so that it holds no whitespace
``{split}_skipped.txt``    ``path<TAB>reason`` for every image left out (also reported on stderr)
``{split}_progress.json``  how far the split got; lets an interrupted run resume
``extractor.json``         the extractor's identity, becomes ``AdaptConfig.extractor`` in training
=========================  ===========================================================================

Resuming: after every batch the arrays are flushed, the text files flushed and synced, and only then
the progress file is replaced (atomically). Rerunning the same command after a crash or Ctrl-C
truncates the text files to the recorded sizes and continues at the first unfinished batch, so no
work is lost and no row is written twice. ``--restart`` starts the splits over.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import quote

# OpenMP threads that busy-wait for work make torch several times slower whenever another process
# uses the cores (measured on a shared 2-core machine: 1.3 s instead of 0.2 s per image); sleeping
# costs a few percent when the cores are free. Read once, when torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from numpy.lib import format as npy_format  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from adapt.io import atomic_write_json, resize_npy  # noqa: E402
from adapt.regions import (  # noqa: E402
    BACKENDS,
    DEFAULT_EXTRACTOR,
    DEFAULT_NUM_REGIONS,
    BottomUpAttentionExtractor,
    ExtractorError,
    FasterRcnnExtractor,
    ImageError,
    RegionExtractor,
    build_extractor,
    identity_differences,
    load_image,
)
from adapt.regions.bottom_up_net import PUBLISHED_FILE, PUBLISHED_REPO  # noqa: E402
from training.data import CAPTIONS_PER_IMAGE, EXTRACTOR_FILE, DatasetError, read_extractor  # noqa: E402

# Backends whose weights --weights / --weights-repo point at, and the file a Hub repo holds by default.
WEIGHTS_FILES = {FasterRcnnExtractor.name: "model.safetensors", BottomUpAttentionExtractor.name: PUBLISHED_FILE}
# Karpathy split names -> precomp split names.
KARPATHY_SPLITS = {"val": "dev", "restval": "train"}
TEXT_FILES = ("caps", "ids", "skipped")

# The images of a split's records from record ``start`` on, in record order: ``(record.image, the
# image or the ImageError that loading it raised)``. A folder of files is one source
# (:func:`folder_images`); a Hub dataset streamed by ``training.prepare`` is another.
ImageStream = Callable[[int], Iterable[tuple[str, "Image.Image | ImageError"]]]


class ExtractError(ValueError):
    """Inputs or an output folder that extraction cannot use; the message says what to do."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of the dataset: its path relative to the images folder, split and captions."""

    image: str
    split: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class SplitResult:
    """What one split's extraction left on disk: ``written`` images, ``skipped`` images."""

    split: str
    written: int
    skipped: int


def read_records(path: str | Path, default_split: str = "train") -> list[ImageRecord]:
    """Images with their captions from a Karpathy JSON (``.json``) or a CSV / JSONL table.

    Raises:
        ExtractError: unknown file type or a malformed file (the message names the entry).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ExtractError(f"captions file {path} does not exist")
    if suffix == ".json":
        return _read_karpathy(path)
    if suffix in (".csv", ".jsonl"):
        return _read_table(path, default_split)
    raise ExtractError(f"{path}: expected a Karpathy-style .json, a .csv or a .jsonl captions file")


def _read_karpathy(path: Path) -> list[ImageRecord]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["images"]
        return [
            ImageRecord(
                image=str(Path(entry.get("filepath", "")) / entry["filename"]),
                split=KARPATHY_SPLITS.get(entry["split"], entry["split"]),
                captions=_clean([sentence["raw"] for sentence in entry["sentences"]]),
            )
            for entry in entries
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExtractError(f"{path}: not a Karpathy-style captions file ({type(e).__name__}: {e}); expected "
                           '{"images": [{"filename", "split", "sentences": [{"raw"}]}]}') from e


def _read_table(path: Path, default_split: str) -> list[ImageRecord]:
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(f))
        else:
            try:
                rows = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError as e:
                raise ExtractError(f"{path}: line {e.lineno} of a JSONL file is not JSON ({e})") from e
    grouped: dict[tuple[str, str], list[str]] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("image") or row.get("caption") is None:
            raise ExtractError(f"{path}: row {number} lacks the 'image' or 'caption' column: {row!r}")
        grouped.setdefault((row.get("split") or default_split, row["image"]), []).append(row["caption"])
    return [ImageRecord(image, split, _clean(captions)) for (split, image), captions in grouped.items()]


def _clean(captions: list[str]) -> tuple[str, ...]:
    # caps.txt is line-based: a caption must be one line, and blank captions are no captions.
    return tuple(" ".join(str(c).split()) for c in captions if str(c).strip())


def folder_images(records: Sequence[ImageRecord], images_dir: str | Path, max_pixels: int) -> ImageStream:
    """The :data:`ImageStream` of image files ``images_dir / record.image``."""
    def stream(start: int) -> Iterator[tuple[str, Image.Image | ImageError]]:
        for record in records[start:]:
            try:
                yield record.image, load_image(Path(images_dir) / record.image, max_pixels)
            except ImageError as e:
                yield record.image, e
    return stream


def extract_dataset(
    records: Sequence[ImageRecord],
    images_dir: str | Path | None,
    out_dir: str | Path,
    extractor: RegionExtractor,
    splits: Sequence[str] | None = None,
    batch_size: int = 8,
    captions_per_image: int = CAPTIONS_PER_IMAGE,
    restart: bool = False,
    show_progress: bool = True,
    images: Callable[[str, Sequence[ImageRecord]], ImageStream] | None = None,
) -> list[SplitResult]:
    """Extract every split (or the given ``splits``) of ``records`` into ``out_dir``.

    Images are the files under ``images_dir``, or ``images(split, split_records)``'s stream.

    Raises:
        ExtractError: ``out_dir`` holds features of another extractor, a split is unknown, or the
            extractor gives images different numbers of regions (the arrays need one).
    """
    fewest, most = extractor.regions_per_image
    if fewest != most:
        raise ExtractError(f"{extractor.name} gives each image {fewest} to {most} regions, but the precomp arrays "
                           "hold a fixed number per image; extract with min_regions equal to num_regions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity_path = out_dir / EXTRACTOR_FILE
    try:
        recorded = read_extractor(out_dir)
    except DatasetError as e:
        raise ExtractError(f"{e}; choose another --out folder") from e
    if recorded is not None:
        differences = identity_differences(recorded, extractor.identity, names=("the folder", "this extractor"))
        if differences:
            raise ExtractError(f"{out_dir} holds features of another region extractor, but all splits of a "
                               "dataset must come from one; choose another --out folder. Differences:\n  - "
                               + "\n  - ".join(differences))
    atomic_write_json(identity_path, extractor.identity, indent=2)

    available = list(dict.fromkeys(record.split for record in records))
    unknown = sorted(set(splits or ()) - set(available))
    if unknown:
        raise ExtractError(f"no images for split(s) {unknown}; the captions file has {available}")
    results = []
    for split in splits or available:
        chosen = [r for r in records if r.split == split]
        results.append(extract_split(chosen, split, images_dir, out_dir, extractor, batch_size, captions_per_image,
                                     restart, show_progress, None if images is None else images(split, chosen)))
    return results


def extract_split(
    records: Sequence[ImageRecord],
    split: str,
    images_dir: str | Path | None,
    out_dir: str | Path,
    extractor: RegionExtractor,
    batch_size: int = 8,
    captions_per_image: int = CAPTIONS_PER_IMAGE,
    restart: bool = False,
    show_progress: bool = True,
    images: ImageStream | None = None,
) -> SplitResult:
    """Extract one split, resuming a previous run of the same inputs unless ``restart``.

    ``images``: where the records' images come from (default: the files under ``images_dir``).

    Raises:
        ExtractError: the split's files come from other inputs or settings (and not ``restart``).
    """
    out_dir = Path(out_dir)
    images = images or folder_images(records, images_dir, extractor.max_pixels)
    files = {name: out_dir / f"{split}_{name}.txt" for name in TEXT_FILES}
    arrays = {"ims": out_dir / f"{split}_ims.npy", "boxes": out_dir / f"{split}_boxes.npy"}
    progress_path = out_dir / f"{split}_progress.json"
    fingerprint = _fingerprint(records, extractor.identity, captions_per_image)

    state = None if restart or not progress_path.is_file() else json.loads(progress_path.read_text(encoding="utf-8"))
    if state is not None and state["fingerprint"] != fingerprint:
        raise ExtractError(f"{progress_path}: an earlier run wrote split {split!r} from other images, captions "
                           "or extractor settings; pass --restart to overwrite it, or choose another --out")
    if state is None:
        state = {"fingerprint": fingerprint, "inputs_done": 0, "rows": 0,
                 "text_bytes": dict.fromkeys(TEXT_FILES, 0), "complete": False}
        for path in files.values():
            path.write_bytes(b"")
        _create_arrays(arrays, len(records), extractor)
    if not state["complete"]:
        for name, path in files.items():
            with open(path, "r+b") as f:
                f.truncate(state["text_bytes"][name])
        if state["inputs_done"] < len(records):
            _run_batches(records, images, extractor, batch_size, captions_per_image, state, files, arrays,
                         progress_path, split, show_progress)
        for path in arrays.values():
            resize_npy(path, state["rows"])
        state["complete"] = True
        atomic_write_json(progress_path, state)
    skipped = len(files["skipped"].read_text(encoding="utf-8").splitlines())
    print(f"{split}: {state['rows']} images written to {out_dir}, {skipped} skipped"
          + (f" (listed in {files['skipped'].name})" if skipped else ""), file=sys.stderr)
    return SplitResult(split, state["rows"], skipped)


def _create_arrays(arrays: dict[str, Path], n_images: int, extractor: RegionExtractor) -> None:
    # Preallocated for every input image; shrunk to the images actually written at the end.
    shapes = {"ims": (n_images, extractor.num_regions, extractor.feature_dim),
              "boxes": (n_images, extractor.num_regions, 4)}
    for name, path in arrays.items():
        npy_format.open_memmap(path, mode="w+", dtype=np.float32, shape=shapes[name]).flush()


def _run_batches(
    records: Sequence[ImageRecord],
    images: ImageStream,
    extractor: RegionExtractor,
    batch_size: int,
    captions_per_image: int,
    state: dict[str, Any],
    files: dict[str, Path],
    arrays: dict[str, Path],
    progress_path: Path,
    split: str,
    show_progress: bool,
) -> None:
    features = npy_format.open_memmap(arrays["ims"], mode="r+")
    boxes = npy_format.open_memmap(arrays["boxes"], mode="r+")
    expected = (len(records), extractor.num_regions, extractor.feature_dim)
    if features.shape != expected:
        raise ExtractError(f"{arrays['ims']}: shape {features.shape}, expected {expected}; pass --restart")
    handles = {name: open(path, "ab") for name, path in files.items()}
    bar = tqdm(total=len(records), initial=state["inputs_done"], unit="img", desc=split, disable=not show_progress)
    stream = iter(images(state["inputs_done"]))
    try:
        for start in range(state["inputs_done"], len(records), batch_size):
            batch = records[start:start + batch_size]
            kept, loaded = [], []
            for record in batch:
                key, image = next(stream, (None, None))
                if key != record.image:
                    raise ExtractError(f"the images of split {split!r} came in another order than its records: "
                                       f"{key!r} where {record.image!r} was expected")
                if len(record.captions) < captions_per_image:
                    reason = f"{len(record.captions)} captions, {captions_per_image} needed"
                elif isinstance(image, ImageError):
                    reason = " ".join(str(image).split())
                else:
                    loaded.append(image)
                    kept.append(record)
                    continue
                print(f"skipping {record.image}: {reason}", file=sys.stderr)
                handles["skipped"].write(f"{record.image}\t{reason}\n".encode())
            regions = extractor.extract_batch(loaded, batch_size=max(1, len(loaded)))
            row = state["rows"]
            for offset, region in enumerate(regions):
                features[row + offset] = region.features
                boxes[row + offset] = region.boxes
            features.flush()
            boxes.flush()
            for record in kept:
                handles["caps"].write("".join(f"{c}\n" for c in record.captions[:captions_per_image]).encode())
                handles["ids"].write(f"{quote(record.image)}\n".encode())
            for handle in handles.values():
                handle.flush()
                os.fsync(handle.fileno())
            # Progress is recorded only after everything it vouches for is on disk.
            state["inputs_done"] = start + len(batch)
            state["rows"] = row + len(regions)
            state["text_bytes"] = {name: handle.tell() for name, handle in handles.items()}
            atomic_write_json(progress_path, state)
            bar.update(len(batch))
    finally:
        bar.close()
        for handle in handles.values():
            handle.close()


def _fingerprint(records: Sequence[ImageRecord], identity: dict[str, Any], captions_per_image: int) -> str:
    content = json.dumps({"identity": identity, "captions_per_image": captions_per_image,
                          "records": [[r.image, r.captions] for r in records]}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path, help="folder the image paths are relative to")
    parser.add_argument("--captions", required=True, type=Path,
                        help="Karpathy-style .json, or .csv / .jsonl with columns image, caption[, split]")
    parser.add_argument("--out", required=True, type=Path, help="output folder (precomp layout)")
    parser.add_argument("--splits", nargs="+", help="splits to extract (default: all in the captions file)")
    parser.add_argument("--extractor", default=DEFAULT_EXTRACTOR, choices=sorted(BACKENDS))
    parser.add_argument("--num-regions", type=int, default=DEFAULT_NUM_REGIONS, help="regions per image (k)")
    parser.add_argument("--with-geometry", action="store_true", help="append 5 box-geometry values to each feature")
    parser.add_argument("--with-labels", action="store_true",
                        help="append the detector's 90 COCO class scores to each feature")
    parser.add_argument("--with-scene", action="store_true",
                        help="append the whole image's 1000 ImageNet probabilities (EfficientNet-Lite3) to each feature")
    parser.add_argument("--whole-image", action="store_true",
                        help="make the first region of every image the whole image")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call and per saved step")
    parser.add_argument("--captions-per-image", type=int, default=CAPTIONS_PER_IMAGE,
                        help="captions kept per image; images with fewer are skipped")
    parser.add_argument("--default-split", default="train", help="split of CSV/JSONL rows without one")
    with_weights = " / ".join(WEIGHTS_FILES)
    parser.add_argument("--weights", type=Path, help=f"{with_weights}: local weights file")
    parser.add_argument("--weights-repo", help=f"{with_weights}: Hub repo holding the weights "
                                               f"({BottomUpAttentionExtractor.name}: default {PUBLISHED_REPO})")
    parser.add_argument("--weights-file", help="file name in --weights-repo (default: "
                                               + ", ".join(f"{name}: {file}" for name, file in WEIGHTS_FILES.items()) + ")")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--restart", action="store_true", help="discard earlier progress of the splits")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    options: dict[str, Any] = {"num_regions": args.num_regions, "with_geometry": args.with_geometry,
                               "with_labels": args.with_labels, "with_scene": args.with_scene,
                               "whole_image": args.whole_image,
                               "device": args.device}
    if args.weights or args.weights_repo:
        if args.extractor not in WEIGHTS_FILES:
            parser.error(f"--weights / --weights-repo apply to --extractor {' or '.join(WEIGHTS_FILES)} only")
        options.update({"weights": args.weights} if args.weights else
                       {"repo_id": args.weights_repo, "filename": args.weights_file or WEIGHTS_FILES[args.extractor]})
    try:
        records = read_records(args.captions, args.default_split)
        try:
            extractor = build_extractor(args.extractor, **options)
        except ValueError as e:  # settings the backend does not take, e.g. --with-labels
            parser.error(str(e))
        extract_dataset(records, args.images, args.out, extractor, args.splits, args.batch_size,
                        args.captions_per_image, args.restart)
    except (ExtractError, ExtractorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
