"""The pointing game (issue 33 item 8): the highlight points at the object a phrase names."""

from __future__ import annotations

import numpy as np
import pytest

from adapt.pipeline import Retriever
from checkpoints import DEFAULT_CHECKPOINT
from adapt.regions import Regions
from adapt.visualize import looked_at, pointed_regions
from training.pointing_game import centre_inside, hit_rates, play, read_game
from training.real_photos import installed

# Hits (of 33 phrases on 12 photos) the shipped model's drawing must keep: measured 21 (63.6 %) on
# 2026-12-05 by the share above neutral captions' (17 by the share alone). A regression guard, not
# the goal of 80 %: the misses are mostly objects the detector boxes only inside a larger one (a
# hat, glasses, a flag behind a person) or never boxes at all (a lighter, a coin).
MIN_HITS = 21


def four_regions() -> Regions:
    """A whole-image fill, a grid-cell fill and two detections on a 100 x 100 image."""
    return Regions(boxes=np.array([[0, 0, 100, 100], [10, 10, 60, 60], [60, 60, 90, 90], [0, 0, 50, 50]], np.float32),
                   features=np.zeros((4, 2), np.float32), labels=["", "dog", "cat", ""],
                   scores=np.array([0, 0.9, 0.8, 0], np.float32), is_fill=np.array([True, False, False, True]),
                   image_size=(100, 100))


def test_the_drawing_points_at_detections_and_keeps_the_whole_image_share_as_a_number():
    regions = four_regions()
    weights = np.array([0.5, 0.1, 0.3, 0.1])
    assert pointed_regions(regions, weights, top=3).tolist() == [2, 1]
    assert looked_at(regions, weights) == "cat 30%, dog 10%; whole image 50%"


def test_the_drawing_points_by_the_share_above_neutral_captions_when_given():
    regions = four_regions()
    weights = np.array([0.5, 0.3, 0.15, 0.05])
    neutral = np.array([0.5, 0.3, 0.05, 0.15])  # the dog box takes this much of any caption's score
    assert pointed_regions(regions, weights, top=1).tolist() == [1]
    assert pointed_regions(regions, weights, top=2, neutral=neutral).tolist() == [2, 1]
    assert looked_at(regions, weights, neutral=neutral) == "cat 15%, dog 30%; whole image 50%"


def test_without_detections_the_drawing_points_at_grid_cells_not_the_whole_image():
    regions = four_regions()
    regions.is_fill[:] = True
    assert pointed_regions(regions, np.array([0.7, 0.1, 0.05, 0.15]), top=1).tolist() == [3]


def test_the_pointing_game_keeps_its_hit_rate():
    targets = read_game()
    present, missing = installed([t.photo for t in targets])
    if missing:
        pytest.skip(f"photo sources not installed: {', '.join(missing)}")
    assert len(targets) >= 25 and len({t.photo.path for t in targets}) >= 10
    results = play(Retriever.from_pretrained(DEFAULT_CHECKPOINT), targets)
    hits = sum(r.hit_drawn for r in results)
    assert hits >= MIN_HITS, [(r.target.phrase, r.labels[1]) for r in results if not r.hit_drawn]
    assert hit_rates(results)[2] == hits / len(results)
    assert hits > sum(r.hit_share for r in results)  # pointing by the share alone does worse


def test_a_hit_is_the_centre_of_the_region_inside_the_box():
    assert centre_inside(np.array([0, 0, 20, 20]), (5, 5, 15, 15))
    assert not centre_inside(np.array([0, 0, 20, 20]), (11, 0, 30, 30))
