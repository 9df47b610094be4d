"""What is true of a scene: spatial relations between two boxes, size classes and halves of the picture.

Boxes are ``(x1, y1, x2, y2)`` pixels of a ``size`` square image; each predicate holds only when
nobody would dispute it (objects ``GAP`` apart, sizes well inside their class).
"""

from __future__ import annotations

import math

from training.datasets.scenes.layout import GAP, LARGE_SCALE, SMALL_LONG_SIDE, SMALL_SCALE, Box

NEAR = 0.25                 # "next to": at most this far apart horizontally


def _center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def left_of(a: Box, b: Box, size: int) -> bool:
    """``a`` is wholly left of ``b``, and more to the side than above or below it."""
    (ax, ay), (bx, by) = _center(a), _center(b)
    return a[2] + round(GAP * size) <= b[0] and abs(ay - by) <= bx - ax


def above(a: Box, b: Box, size: int) -> bool:
    """``a`` is wholly above ``b``, and more above it than to the side."""
    (ax, ay), (bx, by) = _center(a), _center(b)
    return a[3] + round(GAP * size) <= b[1] and abs(ax - bx) <= by - ay


def next_to(a: Box, b: Box, size: int) -> bool:
    """Side by side: apart horizontally by at most ``NEAR``, overlapping vertically by half the lower."""
    horizontal_gap = max(a[0] - b[2], b[0] - a[2])
    overlap = min(a[3], b[3]) - max(a[1], b[1])
    return 0 < horizontal_gap <= NEAR * size and overlap >= 0.5 * min(a[3] - a[1], b[3] - b[1])


def bigger(a: Box, b: Box, size: int) -> bool:
    """``a`` covers at least twice the area of ``b``."""
    return (a[2] - a[0]) * (a[3] - a[1]) >= 2 * (b[2] - b[0]) * (b[3] - b[1])


def size_class(box: Box, size: int) -> str | None:
    """"large" or "small" by the box's scale relative to the image (the layout's two ranges), or None
    in between: a long object shrunk to fit the image, or a thin one that is small in area but long
    enough (over ``SMALL_LONG_SIDE``) that nobody would call it small."""
    width, height = box[2] - box[0], box[3] - box[1]
    scale = math.sqrt(width * height)
    if scale >= LARGE_SCALE[0] * size - 1:
        return "large"
    if scale <= SMALL_SCALE[1] * size + 1 and max(width, height) <= SMALL_LONG_SIDE * size:
        return "small"
    return None


def horizontal_half(box: Box, size: int) -> str | None:
    """"left" or "right" when the box lies wholly in that half of the picture, else None."""
    return "left" if box[2] <= size / 2 else "right" if box[0] >= size / 2 else None


def vertical_half(box: Box, size: int) -> str | None:
    """"top" or "bottom" when the box lies wholly in that half of the picture, else None."""
    return "top" if box[3] <= size / 2 else "bottom" if box[1] >= size / 2 else None
