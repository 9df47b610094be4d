"""Drawing where a caption's fovea looked: region weights as light on the image, top boxes outlined."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from adapt.gallery import SearchHit
from adapt.pipeline import RankedCaptions
from adapt.regions import Regions
from adapt.regions.image import shrink_to_max_side
from adapt.regions.scene import scene_classes

_OUTLINE = (255, 196, 0)
_DIM = 0.3  # brightness of the least attended pixels
# Detector labels are shown only at this score or above: below it, SSD's guesses on objects it was
# never trained on are mostly wrong ("tie" on a cat, "kite" on a lobster, in the real-photo set).
LABEL_MIN_SCORE = 0.5
# What the model sees lists the scene classifier's classes up to this many, each with at least this
# probability: below it, EfficientNet-Lite3's tail is noise ("coral fungus" on a cat).
SCENE_TOP = 3
SCENE_MIN_SCORE = 0.05


def regions_in(regions: Regions, size: tuple[int, int]) -> Regions:
    """``regions`` with their boxes in the pixels of the same picture at ``size`` (a thumbnail)."""
    if tuple(size) == tuple(regions.image_size):
        return regions
    scale = np.array([size[0] / regions.image_size[0], size[1] / regions.image_size[1]] * 2, dtype=np.float32)
    return dataclasses.replace(regions, boxes=regions.boxes * scale, image_size=tuple(size))


def region_label(regions: Regions, i: int) -> str:
    """What to call region ``i``: its detector label when trustworthy, else a neutral name."""
    if regions.labels[i] and float(regions.scores[i]) >= LABEL_MIN_SCORE:
        return regions.labels[i]
    return "region" if not regions.is_fill[i] else "whole image" if i == 0 else "area"


def _whole_image_fills(regions: Regions) -> np.ndarray:
    """``(k,)`` bool: which regions are fills spanning the whole image (to a pixel)."""
    width, height = regions.image_size
    spans_all = np.all(np.abs(np.asarray(regions.boxes) - [0, 0, width, height]) < 1, axis=1)
    return spans_all & np.asarray(regions.is_fill)


def pointable_regions(regions: Regions) -> np.ndarray:
    """Indices of the regions a highlight may point at: the detected ones.

    Fills are left out: the whole-image region holds every object, so it often takes the largest
    share of a caption's score without saying where the named object is. When the detector found
    nothing, the fills that do not span the whole image (grid cells) are all there is to point at.
    """
    detected = np.flatnonzero(~np.asarray(regions.is_fill))
    if len(detected):
        return detected
    cells = np.flatnonzero(~_whole_image_fills(regions))
    return cells if len(cells) else np.arange(len(regions.boxes))


def pointing_weights(weights: np.ndarray, neutral: np.ndarray | None) -> np.ndarray:
    """``(k,)`` what the highlight points by: each region's share of the caption's score, less its
    mean share for captions that name nothing when ``neutral`` is given.

    A deliberate deviation from drawing the share of the score itself: large boxes take much of
    every caption's score, named or not, so the share above the neutral captions' is what this
    caption adds to each region (it points at the named object more often in the pointing game,
    :mod:`training.pointing_game`). Pass ``neutral=None`` to point by the share itself.
    """
    return weights if neutral is None else weights - neutral


def pointed_regions(regions: Regions, weights: np.ndarray, top: int = 3,
                    neutral: np.ndarray | None = None) -> np.ndarray:
    """The ``top`` :func:`pointable_regions` with the largest :func:`pointing_weights`, largest first.

    Args:
        regions: the image's ``k`` regions.
        weights: ``(k,)`` each region's share of the caption's score.
        top: how many to return.
        neutral: ``(k,)`` each region's mean share for neutral captions
            (``RankedCaptions.neutral_weights``), or ``None`` to rank by ``weights`` alone.
    """
    candidates = pointable_regions(regions)
    by = pointing_weights(weights, neutral)
    return candidates[np.argsort(-by[candidates], kind="stable")][:top]


def whole_image_share(regions: Regions, weights: np.ndarray) -> float:
    """The summed share of the fills that span the whole image (0 when there are none)."""
    return float(weights[_whole_image_fills(regions)].sum())


def looked_at(regions: Regions, weights: np.ndarray, top: int = 3, neutral: np.ndarray | None = None) -> str:
    """Where a caption looked, in words: its :func:`pointed_regions` with their shares, then the
    whole image's share ("dog 31%, person 12%, horse 9%; whole image 40%")."""
    pointed = pointed_regions(regions, weights, top, neutral)
    named = ", ".join(f"{region_label(regions, i)} {100 * weights[i]:.0f}%" for i in pointed)
    whole = whole_image_share(regions, weights)
    return f"{named}; whole image {100 * whole:.0f}%" if whole > 0 else named


def seen_concepts(regions: Regions, scene: np.ndarray | None = None, min_score: float = LABEL_MIN_SCORE,
                  scene_top: int = SCENE_TOP, scene_min_score: float = SCENE_MIN_SCORE) -> list[tuple[str, float]]:
    """What the model reads in a photo, best first: the detector's labels scoring at least
    ``min_score`` and the scene classifier's ``scene_top`` classes of at least ``scene_min_score``
    (on the astronaut: person, football helmet, projectile, space shuttle).

    In a concept model (the bundled one) these are names whose embeddings the region encoder adds
    to each region (:mod:`adapt.concepts`), so they tell why a caption wins or loses. A name found
    more than once (detected twice, or by the detector and the scene classifier) is listed once,
    with its best score; a detector score and a class probability both lie in [0, 1] but are not
    the same measure.

    Args:
        regions: the photo's regions (their ``labels`` and ``scores``; fills have no label).
        scene: ``(1000,)`` the whole photo's ImageNet probabilities
            (:meth:`~adapt.regions.RegionExtractor.scene_probabilities`), or ``None``.
    """
    best: dict[str, float] = {}

    def see(name: str, score: float) -> None:
        best[name] = max(best.get(name, 0.0), score)

    for label, score in zip(regions.labels, regions.scores):
        if label and float(score) >= min_score:
            see(label, float(score))
    if scene is not None:
        names = scene_classes()
        for i in np.argsort(-scene, kind="stable")[:scene_top]:
            if float(scene[i]) >= scene_min_score:
                see(names[i], float(scene[i]))
    return sorted(best.items(), key=lambda item: -item[1])


def draw_attention(
    image: Image.Image, regions: Regions, weights: np.ndarray | None, top: int = 3,
    all_boxes: bool = False, max_side: int = 1024, neutral: np.ndarray | None = None,
) -> Image.Image:
    """The image lit where a caption looked, with the ``top`` detected regions outlined.

    Light and outlines go to :func:`pointable_regions` (the detected ones): a pixel's light is the
    summed :func:`pointing_weights` of those covering it (negative ones count as 0), scaled so the brightest pixel keeps its colour and the
    least attended are dimmed to 30 %. The ``top`` of them (:func:`pointed_regions`) are outlined,
    labelled with :func:`region_label` and their share; the whole image's share, which often is
    the largest but points at nothing, is written in the bottom-left corner.

    Args:
        image: the RGB image the regions were extracted from.
        regions: its regions (boxes in its pixels).
        weights: ``(k,)`` each region's share of the score (``RankedCaptions.region_weights``),
            or ``None`` to draw the boxes only.
        top: how many of the most attended detected regions to outline and label with their share.
        all_boxes: also outline every detected region with its label.
        max_side: the drawing is downscaled to at most this many pixels per side.
        neutral: ``(k,)`` each region's mean share for neutral captions, or ``None`` to light and
            point by ``weights`` alone (see :func:`pointing_weights`).
    """
    canvas = shrink_to_max_side(image.convert("RGB"), max_side)
    boxes = np.asarray(regions_in(regions, canvas.size).boxes, dtype=np.float64)
    if weights is not None:
        light = np.zeros((canvas.height, canvas.width), dtype=np.float64)
        by = np.clip(pointing_weights(weights, neutral), 0, None)
        for i in pointable_regions(regions):
            x1, y1, x2, y2 = boxes[i].round().astype(int)
            light[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] += by[i]
        light = (light - light.min()) / max(light.max() - light.min(), 1e-12)
        pixels = np.asarray(canvas, dtype=np.float64) * (_DIM + (1 - _DIM) * light[..., None])
        canvas = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, canvas.width // 45))
    if all_boxes:
        for i in np.flatnonzero(~np.asarray(regions.is_fill)):
            draw.rectangle(boxes[i].tolist(), outline=(120, 200, 255), width=1)
            draw.text((boxes[i][0] + 3, boxes[i][1] + 2), region_label(regions, i), fill=(120, 200, 255), font=font)
    if weights is not None:
        pointed = pointed_regions(regions, weights, top, neutral)
        for i in pointed:
            draw.rectangle(boxes[i].tolist(), outline=_OUTLINE, width=max(2, canvas.width // 300))
        labels = [(boxes[i][:2], f"{region_label(regions, i)} {100 * weights[i]:.0f}%") for i in pointed]
        whole = whole_image_share(regions, weights)
        if whole > 0:
            labels.append(((0, canvas.height - font.size - 8), f"whole image {100 * whole:.0f}%"))
        for (x, y), label in labels:
            left, top_, right, bottom = draw.textbbox((x + 3, y + 2), label, font=font)
            draw.rectangle((left - 2, top_ - 1, right + 2, bottom + 1), fill=(0, 0, 0))
            draw.text((x + 3, y + 2), label, fill=_OUTLINE, font=font)
    return canvas


def draw_ranked(image: Image.Image, ranked: RankedCaptions, row: int, all_boxes: bool = False,
                max_side: int = 1024, contrast: bool = True) -> Image.Image:
    """The highlight of ranked caption ``row``: ``image`` (the ranked picture, at any size) lit
    where it looked (:func:`draw_attention`), by its share above neutral captions' when
    ``contrast`` (see :func:`pointing_weights`)."""
    weights = None if ranked.region_weights is None else ranked.region_weights[row]
    return draw_attention(image, regions_in(ranked.regions, image.size), weights, all_boxes=all_boxes,
                          max_side=max_side, neutral=ranked.neutral_weights if contrast else None)


def draw_hit(image: Image.Image, hit: SearchHit, name: str, rank: int, max_side: int = 1024,
             top: int = 3, contrast: bool = True) -> tuple[Image.Image, str]:
    """A search hit's picture (at any size) lit where the caption looked, and what it is: its
    ``rank`` (1 = best), ``name``, score and ``top`` detected regions with their shares (:func:`looked_at`)
    ("1. dog.jpg (0.412); looked at dog 41%, ...; whole image 30%"); ``contrast`` as in :func:`draw_ranked`."""
    regions = regions_in(hit.regions, image.size)
    neutral = hit.neutral_weights if contrast else None
    drawing = draw_attention(image, regions, hit.region_weights, top=top, max_side=max_side, neutral=neutral)
    looked = "" if hit.region_weights is None else "; looked at " + looked_at(regions, hit.region_weights, top, neutral)
    return drawing, f"{rank}. {name} ({hit.score:.3f}){looked}"
