"""The pointing game: does the highlight point at the object a phrase names?

``training/pointing_game.json`` lists real photos that Python and Debian packages ship (the
sources of :mod:`training.real_photos`), each with phrases naming one object ("a soccer ball") and
that object's box, measured by hand. For each phrase the model scores the photo's regions; the
phrase is a hit when the centre of the region the highlight points at first lies inside the box
(the pointing game of Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016).

Usage::

    python -m training.pointing_game [--checkpoint checkpoints/default] [--misses]

prints the hit rate with the region of the largest share among all regions (fills included: often
the whole image), with the detected region of the largest share, and with the region the drawing
points at (:func:`adapt.visualize.pointed_regions`: the largest share above neutral captions').
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from adapt.pipeline import Retriever
from adapt.visualize import pointed_regions, region_label
from checkpoints import DEFAULT_CHECKPOINT
from training.real_photos import RealPhoto, installed

DEFAULT_GAME = Path(__file__).with_name("pointing_game.json")


@dataclass(frozen=True)
class Target:
    """One phrase of the game: the photo, the phrase and its object's ``(x1, y1, x2, y2)`` box."""

    photo: RealPhoto
    phrase: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Pointing:
    """Where one phrase pointed: the top region over all regions, the detected one of the largest
    share, and the one the drawing outlines first."""

    target: Target
    top_any: int
    top_drawn: int
    hit_any: bool
    hit_share: bool
    hit_drawn: bool
    labels: tuple[str, str]
    drawn_box: np.ndarray


def read_game(path: str | Path = DEFAULT_GAME) -> list[Target]:
    """Every phrase of the game, installed or not."""
    photos = json.loads(Path(path).read_text(encoding="utf-8"))["photos"]
    return [Target(RealPhoto(p["source"], p["path"], o["phrase"], "pointing"), o["phrase"], tuple(o["box"]))
            for p in photos for o in p["objects"]]


def centre_inside(box: np.ndarray, target: Sequence[float]) -> bool:
    """Whether the centre of ``box`` ``(x1, y1, x2, y2)`` lies inside ``target`` (same units)."""
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return bool(target[0] <= x <= target[2] and target[1] <= y <= target[3])


def play(retriever: Retriever, targets: Sequence[Target]) -> list[Pointing]:
    """Score each target's phrase on its photo and check where the highlight points.

    Args:
        retriever: a model with its region extractor (a T2I or ensemble model: it needs region shares).
        targets: the phrases (of installed photos; see :func:`installed`).
    """
    out, regions_of = [], {}
    for t in targets:
        if t.photo.path not in regions_of:
            regions_of[t.photo.path] = retriever.regions(t.photo.load())[1]
        regions = regions_of[t.photo.path]
        ranked = retriever.rank_captions(regions, [t.phrase])
        if ranked.region_weights is None:
            raise ValueError("the pointing game needs region shares: use a model with the T2I direction")
        weights = ranked.region_weights[0]
        top_any = int(np.argmax(weights))
        top_share = int(pointed_regions(regions, weights, top=1)[0])
        top_drawn = int(pointed_regions(regions, weights, top=1, neutral=ranked.neutral_weights)[0])
        hits = [centre_inside(regions.boxes[i], t.box) for i in (top_any, top_share, top_drawn)]
        out.append(Pointing(t, top_any, top_drawn, *hits,
                            (region_label(regions, top_any), region_label(regions, top_drawn)),
                            regions.boxes[top_drawn]))
    return out


def hit_rates(results: Sequence[Pointing]) -> tuple[float, float, float]:
    """The fraction of hits with the top region over all regions, with the detected region of the
    largest share, and with the drawn top region."""
    return tuple(float(np.mean([getattr(r, hit) for r in results])) for hit in ("hit_any", "hit_share", "hit_drawn"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--game", default=str(DEFAULT_GAME), help="the phrases and boxes (JSON)")
    parser.add_argument("--misses", action="store_true", help="list each phrase the drawing misses")
    args = parser.parse_args(argv)
    targets = read_game(args.game)
    present, _ = installed([t.photo for t in targets])
    missing = {p.source for p in {t.photo for t in targets}} - {p.source for p in present}
    if missing:
        parser.error(f"install the photos' sources first: {', '.join(sorted(missing))} "
                     "(see training/real_photos.py INSTALL_HINTS)")
    results = play(Retriever.from_pretrained(args.checkpoint), targets)
    any_region, share, drawn = hit_rates(results)
    print(f"{len(results)} phrases on {len({t.photo.path for t in targets})} photos")
    print(f"top region of all (fills included):          {100 * any_region:.1f}% hits")
    print(f"top detected region by share:                {100 * share:.1f}% hits")
    print(f"top drawn region (share above neutral ones): {100 * drawn:.1f}% hits")
    if args.misses:
        for r in results:
            if not r.hit_drawn:
                print(f"miss: {r.target.photo.path} '{r.target.phrase}' (box {list(r.target.box)}) -> "
                      f"{r.labels[1]} {[round(float(v)) for v in r.drawn_box]}")


if __name__ == "__main__":
    main()
