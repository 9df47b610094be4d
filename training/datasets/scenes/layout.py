"""Scene layout: which stamps share a scene, and where each one goes, without overlap."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from training.datasets.scenes.inventory import BACKGROUNDS, Background, ScenesError, Stamp

# Sizes and distances are fractions of the image side.
MAX_OBJECTS = 4
# An object's scale is the side of the square of its area, so that a bassoon is as visible as a ball.
SMALL_SCALE = (0.13, 0.22)  # a "small" object
LARGE_SCALE = (0.34, 0.46)  # a "large" one; no object is longer than the image less its margins
SMALL_LONG_SIDE = 0.3       # the longest a "small" object may be
LARGE_PROBABILITY = (0.0, 0.5, 0.35, 0.25, 0.15)  # by number of objects
REPEAT_PROBABILITY = 0.3    # chance that one stamp appears 2-4 times (for count captions)
MARGIN = 0.02               # from the image border
GAP = 0.03                  # between two objects' boxes, so that relations are clear-cut
LAYOUT_ATTEMPTS = 12
POSITION_ATTEMPTS = 60
COMPOSITION_DRAWS = 1000

Box = tuple[int, int, int, int]


@dataclass(frozen=True)


class Placement:
    """A stamp pasted at ``box`` (x1, y1, x2, y2 pixels, exclusive ends) of the image."""

    stamp: Stamp
    box: Box


@dataclass(frozen=True)


class Scene:
    """What to draw: a background (with the crop of its photo, as fractions) and the placed stamps."""

    background: Background
    crop: tuple[float, float, float, bool]  # side, x offset, y offset (fractions), mirrored
    placements: tuple[Placement, ...]


def split_rng(seed: int, split: str) -> np.random.Generator:
    """The random stream of one split, independent of the others' sizes."""
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def composition_split(stamps: Sequence[Stamp]) -> str:
    """The split a group of different stamps belongs to: a fixed hash, 10% dev, 10% test, 80% train."""
    bucket = zlib.crc32("|".join(sorted(stamp.path for stamp in stamps)).encode()) % 10
    return {0: "dev", 1: "test"}.get(bucket, "train")


def sample_scene(rng: np.random.Generator, pool: Sequence[Stamp], size: int, split: str) -> Scene:
    """A random scene of 1-4 stamps from ``pool`` for ``split``, laid out on a ``size`` square."""
    stamps = _sample_objects(rng, pool, split)
    boxes = _layout(rng, stamps, size)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    crop = (float(rng.uniform(0.5, 1.0)), float(rng.random()), float(rng.random()), bool(rng.random() < 0.5))
    return Scene(background, crop, tuple(Placement(stamp, box) for stamp, box in zip(stamps, boxes, strict=True)))


def _sample_objects(rng: np.random.Generator, pool: Sequence[Stamp], split: str) -> list[Stamp]:
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    repeats = int(rng.integers(2, count + 1)) if count >= 2 and rng.random() < REPEAT_PROBABILITY else 1
    for _ in range(COMPOSITION_DRAWS):
        chosen = _distinct_stamps(rng, pool, count - repeats + 1)
        if len(chosen) < 2 or split not in ("train", "dev", "test") or composition_split(chosen) == split:
            return [chosen[0]] * repeats + chosen[1:]
    raise ScenesError(f"found no group of stamps for split {split!r} in {COMPOSITION_DRAWS} draws; "
                      f"the stamps folder holds too few stamps ({len(pool)} usable)")


def _distinct_stamps(rng: np.random.Generator, pool: Sequence[Stamp], count: int) -> list[Stamp]:
    """Up to ``count`` random stamps with different head nouns, so that counts and phrases stay true."""
    chosen: list[Stamp] = []
    keys: set[str] = set()
    for index in rng.permutation(len(pool)):
        stamp = pool[int(index)]
        if stamp.key not in keys:
            chosen.append(stamp)
            keys.add(stamp.key)
            if len(chosen) == count:
                break
    return chosen


def _layout(rng: np.random.Generator, stamps: Sequence[Stamp], size: int) -> list[Box]:
    """Non-overlapping boxes (``GAP`` apart) for ``stamps``; falls back to all small after failures."""
    for attempt in range(LAYOUT_ATTEMPTS):
        large_probability = LARGE_PROBABILITY[len(stamps)] if attempt < LAYOUT_ATTEMPTS // 2 else 0.0
        scales = [_scale(rng, size, rng.random() < large_probability) for _ in stamps]
        boxes = _place(rng, [box_size(stamp, scale, size) for stamp, scale in zip(stamps, scales, strict=True)], size)
        if boxes is not None:
            return boxes
    raise ScenesError(f"could not lay out {len(stamps)} objects on a {size}px image; use a larger --size")


def _scale(rng: np.random.Generator, size: int, large: bool) -> int:
    low, high = LARGE_SCALE if large else SMALL_SCALE
    return int(rng.integers(round(low * size), round(high * size) + 1))


def _place(rng: np.random.Generator, sizes: Sequence[tuple[int, int]], size: int) -> list[Box] | None:
    """Random non-overlapping positions for boxes of ``sizes`` (width, height), or None if they did not fit."""
    margin, gap = round(MARGIN * size), round(GAP * size)
    boxes: list[Box | None] = [None] * len(sizes)
    # Largest first: small objects fit in the space the large ones leave.
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i][0] * sizes[i][1]):
        width, height = sizes[index]
        for _ in range(POSITION_ATTEMPTS):
            x = int(rng.integers(margin, size - margin - width + 1))
            y = int(rng.integers(margin, size - margin - height + 1))
            box = (x, y, x + width, y + height)
            if all(other is None or _apart(box, other, gap) for other in boxes):
                boxes[index] = box
                break
        else:
            return None
    return [box for box in boxes if box is not None]


def box_size(stamp: Stamp, scale: int, size: int) -> tuple[int, int]:
    """``(width, height)`` of the stamp with the area of a ``scale`` square, fitting a ``size`` image."""
    aspect = math.sqrt(stamp.width / stamp.height)
    width, height = scale * aspect, scale / aspect
    shrink = min(1.0, (size - 2 * round(MARGIN * size)) / max(width, height))
    return max(1, round(width * shrink)), max(1, round(height * shrink))


def _apart(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
