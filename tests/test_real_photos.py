"""The bundled model on real photos: right on the real-photo set and the app's examples, and its
highlight follows the caption onto the object the caption names."""

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from adapt.pipeline import Retriever
from adapt.regions import load_image
from adapt.regions.scene import scene_classes
from adapt.visualize import LABEL_MIN_SCORE, seen_concepts
from checkpoints import DEFAULT_CHECKPOINT
from training.real_photos import (
    DEFAULT_SET, conse_reference_scores, format_metrics, installed, misses, read_set, real_photo_scores,
    split_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")  # Debian's opencv-doc (.ci/run installs it)
# R@1 (%) the shipped model must keep, both ways, on each half and on all 50 photos: a regression
# guard, not the goal. It has select 88 / 88, holdout 73 / 81, all 50 68 / 74 (the goal of
# 80 is not reached on holdout image->text or on all 50, see checkpoints/default/README.md).
REGRESSION_GUARD = {
    "select": {"i2t_r1": 70.0, "t2i_r1": 70.0},
    "holdout": {"i2t_r1": 70.0, "t2i_r1": 70.0},
    "all": {"i2t_r1": 64.0, "t2i_r1": 70.0},
}


@pytest.fixture(scope="module")
def retriever():
    return Retriever.from_pretrained(DEFAULT_CHECKPOINT)


def test_the_set_lists_real_photos_with_one_caption_each():
    photos = read_set()
    assert len(photos) >= 40
    assert len({p.name for p in photos}) == len(photos) and len({p.caption for p in photos}) == len(photos)
    assert sum(p.source == "tuxpaint" for p in photos) <= len(photos) / 3
    assert {p.split for p in photos} == {"select", "holdout"}


def test_the_set_is_installed_with_the_training_package():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert DEFAULT_SET.parent == ROOT / "training" and DEFAULT_SET.name in package_data["training"]


def test_real_photos_rank_their_caption_and_photo_first(retriever):
    photos, missing = installed(read_set())
    if missing:
        pytest.skip("sources not installed: " + ", ".join(missing) + " (.ci/run installs them)")
    scores = real_photo_scores(retriever, photos)
    metrics = split_metrics(scores, photos)
    print(format_metrics(metrics))
    for part, floors in REGRESSION_GUARD.items():
        for key, floor in floors.items():
            assert metrics[part][key] >= floor, (part, key, metrics[part][key])
    # The misses list names exactly the photos that the whole set's R@1 counts as wrong.
    listed = "\n".join(misses(scores, photos))
    assert listed.count("first caption:") == round(len(photos) * (1 - metrics["all"]["i2t_r1"] / 100))
    assert listed.count("first photo:") == round(len(photos) * (1 - metrics["all"]["t2i_r1"] / 100))


def test_the_apps_examples_rank_their_own_caption_first_for_four_of_five(retriever):
    import app

    captions = app.EXAMPLE_CAPTIONS.splitlines()
    truth = {
        "astronaut.jpg": "A woman in a space suit smiling in front of a flag.",
        "cat.jpg": "A cat lying on a purple blanket.",
        "coffee.jpg": "A cup of coffee on a saucer on a wooden table.",
        "grace_hopper.jpg": "An officer in a navy uniform posing for a portrait.",
        "rocket.jpg": "A rocket lifting off from a launch pad.",
    }
    assert sorted(truth) == sorted(p.name for p in app.EXAMPLES)
    firsts = {path.name: retriever.rank_captions(path, captions).captions[0] for path in app.EXAMPLES}
    right = [name for name, first in firsts.items() if first == truth[name]]
    # The astronaut photo shows a space-shuttle model; the model ranks the rocket caption first.
    assert len(right) >= 4, firsts


def test_what_the_model_sees_explains_the_astronaut(retriever):
    photo = ROOT / "examples" / "astronaut.jpg"
    _, regions = retriever.regions(photo)
    scene = retriever.extractor.scene_probabilities(regions)
    # The probabilities kept in the features are the scene classifier's on the photo (512 px, so
    # extraction classified it at its own size).
    np.testing.assert_allclose(scene, retriever.extractor.scene(load_image(photo)), atol=1e-6)
    seen = dict(seen_concepts(regions, scene))
    # The detector's one trusted label, then EfficientNet-Lite3's reading of the whole photo: the
    # rocket caption wins here (see the test above) because the model sees a shuttle and a projectile.
    assert set(seen) == {"person", "football helmet", "projectile", "space shuttle"}
    assert seen["person"] == max(s for label, s in zip(regions.labels, regions.scores) if label == "person")
    assert seen["football helmet"] == scene[scene_classes().index("football helmet")]
    assert list(seen.values()) == sorted(seen.values(), reverse=True)
    # Detected, but under the trust threshold.
    assert "mouse" in regions.labels and "mouse" not in seen
    assert all(score < LABEL_MIN_SCORE for label, score in zip(regions.labels, regions.scores) if label == "mouse")


def test_a_concept_both_detected_and_in_the_scene_is_seen_once_with_its_best_score(retriever):
    _, regions = retriever.regions(ROOT / "examples" / "coffee.jpg")
    scene = retriever.extractor.scene_probabilities(regions)
    seen = seen_concepts(regions, scene)
    assert [name for name, _ in seen] == ["cup", "espresso"]  # the scene's "cup" (6 %) merged
    assert seen[0][1] == regions.scores[regions.labels.index("cup")] > scene[scene_classes().index("cup")] > 0.05


def top_detected(ranked, row: int) -> int:
    """The detected (not fill) region that caption ``row`` weights most."""
    weights = ranked.region_weights[row]
    detected = np.flatnonzero(~ranked.regions.is_fill)
    return int(detected[np.argmax(weights[detected])])


def test_the_highlight_follows_the_caption_onto_the_named_object(retriever):
    photo = OPENCV_DATA / "messi5.jpg"
    if not photo.is_file():
        pytest.skip("Debian's opencv-doc is not installed (.ci/run installs it)")
    # Measured by hand on the 548 x 342 photo: the ball.
    ball = torch.tensor([[337.0, 288.0, 390.0, 336.0]])
    ranked = retriever.rank_captions(photo, ["a soccer ball", "a man in a red and blue striped shirt"])
    row = {caption: i for i, caption in enumerate(ranked.captions)}
    on_ball = top_detected(ranked, row["a soccer ball"])
    on_man = top_detected(ranked, row["a man in a red and blue striped shirt"])
    assert box_iou(torch.from_numpy(ranked.regions.boxes[[on_ball]]), ball).item() > 0.5
    # The man's caption lights the player: the detector's one confident "person" (0.99; the people
    # behind him score under 0.35). His box spans his kicking leg, so it only grazes the ball's.
    assert ranked.regions.labels[on_man] == "person" and ranked.regions.scores[on_man] > 0.9
    on_player = torch.from_numpy(ranked.regions.boxes[[on_man]])
    assert box_iou(on_player, ball).item() < 0.1


def test_the_zero_shot_conse_reference_puts_each_photo_with_its_caption():
    photos = [p for p in read_set() if p.path in ("chelsea.png", "coffee.png")]
    scores = conse_reference_scores(photos)
    assert scores.shape == (2, 2)
    assert scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]
