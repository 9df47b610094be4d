"""Writing the dataset: every split's images, ``dataset.json``, ``LICENSE-DATA.md``; the command line."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from training.data import CAPTIONS_PER_IMAGE
from training.datasets.scenes.captions import NOVEL_TEMPLATES, SEEN_TEMPLATES, Caption, describe
from training.datasets.scenes.inventory import (
    BACKGROUNDS,
    DEFAULT_STAMPS_DIR,
    INSTALL_HINT,
    NOVEL_CATEGORIES,
    ScenesError,
    StampsNotFoundError,
    read_inventory,
    split_pools,
)
from training.datasets.scenes.layout import Scene, sample_scene, split_rng
from training.datasets.scenes.rendering import StampImages, render_scene

SPLITS = ("train", "dev", "test", "test-novel")

JPEG_QUALITY = 90
MIN_IMAGE_SIZE = 128


def scene_record(scene: Scene, captions: Sequence[Caption], split: str, index: int, imgid: int,
                 first_sentid: int, size: int) -> dict:
    """The Karpathy-style ``images[]`` entry of one scene."""
    name = f"{split}-{index:05d}"
    return {
        "imgid": imgid,
        "split": split,
        "filepath": f"images/{split}",
        "filename": f"{name}.jpg",
        "width": size,
        "height": size,
        "background": scene.background.name,
        "sentences": [{"raw": caption.text, "tokens": re.findall(r"[a-z0-9'-]+", caption.text),
                       "template": caption.template, "imgid": imgid, "sentid": first_sentid + i}
                      for i, caption in enumerate(captions)],
        "objects": [placement.stamp.phrase for placement in scene.placements],
        "boxes": [list(placement.box) for placement in scene.placements],
        "stamps": [placement.stamp.path for placement in scene.placements],
        "categories": [placement.stamp.category for placement in scene.placements],
    }


def generate(out_dir: str | Path, counts: dict[str, int], seed: int = 0, size: int = 384,
             stamps_dir: str | Path = DEFAULT_STAMPS_DIR, novel_categories: Sequence[str] = NOVEL_CATEGORIES,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Write the scenes of every split (``counts``: split -> number of images) to ``out_dir``.

    Returns the written ``dataset.json`` content.

    Raises:
        StampsNotFoundError: no stamps folder, or no usable stamps in it.
        ScenesError: bad arguments, or ``out_dir`` already holds a dataset and not ``overwrite``.
    """
    _check_arguments(counts, seed, size)
    out = Path(out_dir)
    existing = [path.name for path in (out / "dataset.json", out / "images") if path.exists()]
    if existing and not overwrite:
        raise ScenesError(f"{out} already holds {' and '.join(existing)}; pass --overwrite to replace the "
                          "dataset there, or choose another --out")
    stamps = read_inventory(stamps_dir)
    known, novel = split_pools(stamps, novel_categories)
    pools = {split: novel if split == "test-novel" else known for split in SPLITS}
    empty = [split for split in SPLITS if counts.get(split, 0) and not pools[split]]
    if empty:
        raise ScenesError(f"no stamps for split(s) {empty} under {stamps_dir} (novel categories: "
                          f"{', '.join(novel_categories)}); {INSTALL_HINT}")
    images = StampImages(stamps_dir)
    records: list[dict] = []
    for split in SPLITS:
        folder = out / "images" / split
        shutil.rmtree(folder, ignore_errors=True)  # with --overwrite: a larger earlier run's scenes would linger
        folder.mkdir(parents=True)
        rng = split_rng(seed, split)
        for index in tqdm(range(counts.get(split, 0)), desc=split, unit="scene", disable=not progress):
            scene = sample_scene(rng, pools[split], size, split)
            captions = describe(rng, scene, size, split)
            record = scene_record(scene, captions, split, index, len(records), len(records) * CAPTIONS_PER_IMAGE, size)
            image, _ = render_scene(scene, size, images)
            image.save(folder / record["filename"], quality=JPEG_QUALITY)
            records.append(record)
    dataset = {
        "dataset": "scenes",
        "info": {
            "generator": "python -m training.datasets.scenes",
            "seed": seed,
            "size": size,
            "splits": {split: counts.get(split, 0) for split in SPLITS},
            "stamps": {"usable": len(stamps), "known": len(known), "novel": len(novel)},
            "novel_categories": list(novel_categories),
            "templates": {"seen": list(SEEN_TEMPLATES), "novel": list(NOVEL_TEMPLATES)},
            "licence": "GPL-2.0-or-later; see LICENSE-DATA.md",
        },
        "images": records,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "LICENSE-DATA.md").write_text(licence_text(len(known) + len(novel)), encoding="utf-8")
    return dataset


def _check_arguments(counts: dict[str, int], seed: int, size: int) -> None:
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise ScenesError(f"unknown split(s) {unknown}; the splits are {', '.join(SPLITS)}")
    if any(count < 0 for count in counts.values()):
        raise ScenesError(f"image counts must be >= 0, got {counts}")
    if seed < 0:
        raise ScenesError(f"--seed must be >= 0, got {seed}")
    if size < MIN_IMAGE_SIZE:
        raise ScenesError(f"--size must be at least {MIN_IMAGE_SIZE} pixels, got {size}")


def licence_text(stamp_count: int) -> str:
    """``LICENSE-DATA.md``: what the generated images and captions are made of, and under which terms."""
    photos = "\n".join(f"- `{b.name}`: {b.source}. Licence: {b.licence}." for b in BACKGROUNDS if b.photo)
    plain = ", ".join(f"`{b.name}`" for b in BACKGROUNDS if b.photo is None)
    return f"""# Licence of this dataset

Made by `python -m training.datasets.scenes` (the generator itself is Apache-2.0, like the project).

## Objects and captions: GPL-2.0-or-later

The {stamp_count} object cut-outs and the object phrases in the captions come from Debian's
`tuxpaint-stamps-default` (Tux Paint stamps, copyright 2002-2022 Bill Kendrick and the Tux Paint
contributors; <http://sourceforge.net/projects/tuxpaint>), licensed under the GNU General Public
License, version 2 or (at your option) any later version; see `/usr/share/doc/tuxpaint-stamps-default/copyright`
and `/usr/share/common-licenses/GPL-2`. Each image and caption set here is a work based on them, so it
is distributed under the same licence: do not commit it to a repository under another licence, and
regenerate it from the package instead.

## Backgrounds

Photos from scikit-image's sample data (`skimage.data`, which records their sources):

{photos}

Plain colours ({plain}): made by the generator, no third-party material.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.datasets.scenes``; returns the exit status (2 for a generator error)."""
    manual = sys.modules[__package__].__doc__  # the package's docstring is the tool's manual
    parser = argparse.ArgumentParser(prog="python -m training.datasets.scenes",
                                     description=manual.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    parser.add_argument("--train", type=int, default=3000, help="number of train images")
    parser.add_argument("--dev", type=int, default=300, help="number of dev images")
    parser.add_argument("--test", type=int, default=300, help="number of test images")
    parser.add_argument("--test-novel", type=int, default=300,
                        help="number of test images of unseen object categories and caption templates")
    parser.add_argument("--size", type=int, default=384, help="image side in pixels")
    parser.add_argument("--stamps", type=Path, default=DEFAULT_STAMPS_DIR, help="tuxpaint stamps folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    args = parser.parse_args(argv)
    counts = {"train": args.train, "dev": args.dev, "test": args.test, "test-novel": args.test_novel}
    try:
        dataset = generate(args.out, counts, args.seed, args.size, args.stamps, overwrite=args.overwrite)
    except (StampsNotFoundError, ScenesError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stamps = dataset["info"]["stamps"]
    print(f"wrote {len(dataset['images'])} scenes to {args.out} ({stamps['known']} known and "
          f"{stamps['novel']} novel stamps); see {args.out / 'LICENSE-DATA.md'}")
    return 0
