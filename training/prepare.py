"""Flickr30k or COCO with the Karpathy splits, from a Hub dataset (or a local folder in the same layout).

    python -m training.prepare flickr30k --out runs/f30k/data
    python -m training.prepare coco --out runs/coco/data
    python -m training.prepare flickr30k --out DIR --repo-id you/your-f30k --revision REV \\
        --column caption=sentences --column id=img_id [--any-sizes]

Rows are read through ``datasets.load_dataset(..., streaming=True)``: nothing is converted to Arrow
and no image is written to disk. This step reads only the captions (parquet column projection where
the repo is parquet) and writes:

- ``captions.jsonl``: one row per caption, ``{"image": id, "caption": ..., "split": ...}`` (the CSV /
  JSONL layout ``python -m training.extract --captions`` reads), splits named as in the precomp
  files (Karpathy ``val`` -> ``dev``, ``restval`` -> ``train``);
- ``prepared.json``: the source, revision, column mapping and the images per split.

Extraction then streams the images from the same rows (:func:`image_stream`) into the extractor.

Columns (``--column NAME=COLUMN``, dotted for nested fields, e.g. ``caption=json.captions``):
``image`` (a ``datasets.Image``), ``caption`` (a list of strings, or one string a row), ``split``
(the Karpathy split; empty: the Hub split names) and ``id`` (unique per image).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import datasets
from PIL import Image

from adapt.io import atomic_write
from adapt.regions import DEFAULT_MAX_PIXELS, ImageError, load_image
from training.extract import KARPATHY_SPLITS, ImageRecord, ImageStream, read_records

CAPTIONS_FILE = "captions.jsonl"
PREPARED_FILE = "prepared.json"
SPLIT_NAMES = {**KARPATHY_SPLITS, "validation": "dev"}
DEFAULT_COLUMNS = {"image": "image", "caption": "caption", "split": "split", "id": "filename"}


class PrepareError(ValueError):
    """A dataset that does not have the expected layout or sizes; the message says what to do."""


@dataclass(frozen=True)
class Preset:
    """A dataset's default Hub repo, its column mapping and its Karpathy split sizes (images)."""

    repo_id: str
    sizes: dict[str, int]
    columns: dict[str, str] = field(default_factory=dict)
    download_gb: float = 0.0  # the repo's size, for the recipe's plan
    parquet: bool = True  # its files allow reading the captions without the images

    @property
    def split_column(self) -> bool:
        """The Karpathy split is a column (else: the Hub split names)."""
        return bool({**DEFAULT_COLUMNS, **self.columns}["split"])


PRESETS = {
    # One Hub split of 31,783 rows; the Karpathy split is the `split` column.
    "flickr30k": Preset("nlphuji/flickr30k", {"train": 29000, "dev": 1014, "test": 1000}, download_gb=4.4),
    # The Karpathy splits as Hub splits (train = train + restval), COCO-2014 JPEGs with 5 captions each
    # (WebDataset shards: `jpg` + `json` per image).
    "coco": Preset("undefined443/coco-karpathy-wds", {"train": 113287, "dev": 5000, "test": 5000},
                   {"image": "jpg", "caption": "json.captions", "split": "", "id": "__key__"}, download_gb=19.0,
                   parquet=False),
}


def open_rows(source: str, revision: str | None = None, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """The Hub splits of ``source`` (a Hub dataset id or a local folder) as streaming datasets.

    ``columns``: read only these top-level columns where the files allow it (parquet: the image
    bytes are then not downloaded at all).
    """
    kwargs: dict[str, Any] = {"revision": revision, "streaming": True}
    try:
        try:
            return dict(datasets.load_dataset(source, **kwargs, **({"columns": list(columns)} if columns else {})))
        except (TypeError, ValueError) as e:
            if not columns or "columns" not in str(e):
                raise
            return dict(datasets.load_dataset(source, **kwargs))  # not parquet: every column is read
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise PrepareError(f"cannot open the dataset {source!r} (revision {revision or 'main'}): {e}") from e


def value(row: dict[str, Any], path: str) -> Any:
    """``row``'s field at a dotted ``path``; PrepareError naming the missing column otherwise."""
    current: Any = row
    for part in path.split("."):
        if not isinstance(current, dict) or part not in current:
            known = sorted(current) if isinstance(current, dict) else []
            raise PrepareError(f"the dataset has no column {path!r} (found {known}); map the columns with "
                               "--column NAME=COLUMN, e.g. --column caption=sentences")
        current = current[part]
    return current


def check_columns(rows: dict[str, Any], wanted: Sequence[str]) -> None:
    """PrepareError naming the first top-level column in ``wanted`` that a Hub split lacks (where the
    files declare their columns; otherwise reading a row finds it)."""
    for dataset in rows.values():
        known = list(dataset.features or [])
        missing = [column for column in wanted if known and column not in known]
        if missing:
            raise PrepareError(f"the dataset has no column {missing[0]!r} (found {known}); map the columns with "
                               "--column NAME=COLUMN, e.g. --column caption=sentences")


def _split_of(row: dict[str, Any], hub_split: str, columns: dict[str, str]) -> str:
    name = str(value(row, columns["split"])) if columns["split"] else hub_split
    return SPLIT_NAMES.get(name, name)


def read_captions(rows: dict[str, Any], columns: dict[str, str]) -> list[ImageRecord]:
    """Every image of the dataset with its split and captions, in the dataset's order."""
    images: dict[str, ImageRecord] = {}
    for hub_split, dataset in rows.items():
        for row in dataset:
            key, captions = str(value(row, columns["id"])), value(row, columns["caption"])
            captions = [captions] if isinstance(captions, str) else list(captions)
            split = _split_of(row, hub_split, columns)
            if key in images:  # one row a caption
                captions = [*images[key].captions, *captions]
            images[key] = ImageRecord(key, split, tuple(" ".join(str(c).split()) for c in captions))
    return list(images.values())


def check_sizes(records: Sequence[ImageRecord], expected: dict[str, int], name: str) -> dict[str, int]:
    """Images per split; PrepareError when they are not the Karpathy sizes of ``name``."""
    counts = {split: sum(r.split == split for r in records) for split in dict.fromkeys(r.split for r in records)}
    if counts != expected:
        wanted = ", ".join(f"{s} {n:,}" for s, n in expected.items())
        found = ", ".join(f"{s} {n:,}" for s, n in counts.items()) or "no images"
        raise PrepareError(f"the dataset has {found} images per split, but the Karpathy split of {name} has {wanted}; "
                           "check --repo-id / --revision / --column split=..., or pass --any-sizes for other data")
    return counts


def prepare(
    name: str, out: str | Path, *, repo_id: str | None = None, revision: str | None = None,
    columns: dict[str, str] | None = None, any_sizes: bool = False,
) -> dict[str, Any]:
    """Write ``captions.jsonl`` and ``prepared.json`` to ``out`` (skipped when done with the same
    settings); returns the contents of ``prepared.json``."""
    preset = PRESETS[name]
    mapping = {**DEFAULT_COLUMNS, **(preset.columns if repo_id is None else {}), **(columns or {})}
    source = repo_id or preset.repo_id
    settings = {"dataset": name, "source": source, "revision": revision, "columns": mapping}
    out = Path(out)
    done = out / PREPARED_FILE
    if done.is_file() and (prepared := json.loads(done.read_text(encoding="utf-8")))["settings"] == settings:
        return prepared
    wanted = [path.split(".")[0] for key, path in mapping.items() if path]
    check_columns(open_rows(source, revision), wanted)
    records = read_captions(open_rows(source, revision, [c for c in wanted if c != mapping["image"]]), mapping)
    counts = ({s: sum(r.split == s for r in records) for s in dict.fromkeys(r.split for r in records)} if any_sizes
              else check_sizes(records, preset.sizes, name))
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"image": r.image, "caption": c, "split": r.split}) + "\n"
                    for r in records for c in r.captions)
    atomic_write(out / CAPTIONS_FILE, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    prepared = {"settings": settings, "images": counts}
    atomic_write(done, lambda tmp: tmp.write_text(json.dumps(prepared, indent=1) + "\n", encoding="utf-8"))
    return prepared


def prepared_records(out: str | Path) -> list[ImageRecord]:
    """The records ``prepare`` wrote to ``out``."""
    return read_records(Path(out) / CAPTIONS_FILE)


def decode(cell: dict[str, Any], key: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | ImageError:
    """An undecoded ``datasets.Image`` cell (``{"bytes", "path"}``) as an RGB image, or the ImageError."""
    try:
        data = cell.get("bytes")
        return load_image(Image.open(io.BytesIO(data)) if data else Path(cell["path"]), max_pixels, name=key)
    except ImageError as e:
        return e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return ImageError(f"{key}: not a readable image ({e})")


def image_stream(prepared: dict[str, Any], split: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageStream:
    """The images of ``split``, streamed from the dataset ``prepared`` describes, for extraction."""
    settings = prepared["settings"]
    columns = settings["columns"]

    def stream(start: int) -> Iterator[tuple[str, Image.Image | ImageError]]:
        seen = 0
        for row in _undecoded_rows(settings, split):
            seen += 1
            if seen > start:
                key = str(value(row, columns["id"]))
                yield key, decode(value(row, columns["image"]), key, max_pixels)
    return stream


def _undecoded_rows(settings: dict[str, Any], split: str) -> Iterator[dict[str, Any]]:
    """The rows of ``split``, their images undecoded (``{"bytes", "path"}``)."""
    columns = settings["columns"]
    for hub_split, rows in open_rows(settings["source"], settings["revision"]).items():
        if not columns["split"] and SPLIT_NAMES.get(hub_split, hub_split) != split:
            continue  # the Hub split names are the Karpathy splits: skip the others unread
        if "." not in columns["image"]:  # decode only the images that are used
            rows = rows.cast_column(columns["image"], datasets.Image(decode=False))
        yield from (row for row in rows if _split_of(row, hub_split, columns) == split)


def write_images(prepared: dict[str, Any], split: str, folder: str | Path) -> None:
    """Write the image files of ``split`` into ``folder`` as the dataset holds them (file name: the
    image's id), skipping those written earlier: the gallery index's thumbnails are made from them."""
    columns = prepared["settings"]["columns"]
    for row in _undecoded_rows(prepared["settings"], split):
        path = Path(folder) / str(value(row, columns["id"]))
        if not path.is_file():
            cell = value(row, columns["image"])
            data = cell.get("bytes") or Path(cell["path"]).read_bytes()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _column(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or name not in DEFAULT_COLUMNS:
        raise argparse.ArgumentTypeError(f"expected NAME=COLUMN with NAME one of {sorted(DEFAULT_COLUMNS)}, got {text!r}")
    return name, path


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the dataset (shared with ``training.recipe``)."""
    parser.add_argument("dataset", choices=sorted(PRESETS), help="which Karpathy split sizes and defaults apply")
    parser.add_argument("--repo-id", help="Hub dataset id or local folder (default: "
                        + ", ".join(f"{n}: {p.repo_id}" for n, p in PRESETS.items()) + ")")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    parser.add_argument("--column", type=_column, action="append", default=[], metavar="NAME=COLUMN",
                        help=f"column mapping, dotted for nested fields (defaults {DEFAULT_COLUMNS})")
    parser.add_argument("--any-sizes", action="store_true", help="accept split sizes other than the Karpathy ones")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.prepare``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="folder for captions.jsonl and prepared.json")
    args = parser.parse_args(argv)
    try:
        prepared = prepare(args.dataset, args.out, repo_id=args.repo_id, revision=args.revision,
                           columns=dict(args.column), any_sizes=args.any_sizes)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: " + ", ".join(f"{s} {n:,} images" for s, n in prepared["images"].items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
