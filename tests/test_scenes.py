"""The offline scene dataset generator: inventory rules, captions that are true, splits, determinism.

Most tests run on a small stamps folder made here (so they need neither Debian's stamps nor their
licence); the last ones also check the real ``tuxpaint-stamps-default`` when it is installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.datasets import scenes
from training.datasets.scenes import layout
from training.datasets.scenes import (
    NOVEL_CATEGORIES,
    NOVEL_TEMPLATES,
    SEEN_TEMPLATES,
    Background,
    Placement,
    Scene,
    ScenesError,
    Stamp,
    StampsNotFoundError,
)

COUNTS = {"train": 12, "dev": 4, "test": 4, "test-novel": 4}
SIZE = 160

# path -> description, for stamps that the inventory must take
PHOTOS = {
    "animals/birds/duck.png": "A duck.\nUn canard.",
    "animals/birds/crow.png": "A crow.",
    "animals/birds/owl.png": "An owl.",
    "food/fruit/apple_red.png": "A red apple.",
    "food/fruit/banana.png": "A banana.",
    "food/fruit/lemon.png": "A yellow lemon.",
    "food/fruit/grapes.png": "A bunch of grapes.",
    "vehicles/masstransit/bus.png": "A green bus.",
    "household/key.png": "A key.",
    "sports/tennis_ball.png": "A tennis ball.",
    "animals/fish/clownfish.png": "A clownfish.",
    "animals/fish/seahorse.png": "A seahorse.",
    "food/vegetables/carrot.png": "A carrot.",
    "food/vegetables/eggplant.png": "An eggplant.",
    "animals/mammals/bovines/cow.png": "A cow.",
    "hobbies/music/string/violin.png": "A violin.",
    "plants/eggplant.png": "An eggplant with fruit.",  # shares "eggplant" with a novel stamp: in no split
}
# path -> description, for stamps that it must leave out (and why)
LEFT_OUT = {
    "animals/birds/cartoon/tux.png": "A penguin.",          # a drawing folder
    "symbols/shapes/circle.png": "A circle.",                # not an object folder
    "food/fruit/the_sun.png": "The Sun.",                    # no indefinite article
    "food/fruit/slogan.png": "Eat your broccoli!",           # not a noun phrase
    "food/fruit/drawn_pear.png": "A pear.",                  # flat fills (see _write_stamp)
    "food/fruit/tiny_plum.png": "A plum.",                   # too small
}


def _write_stamp(path: Path, description: str | None, rng: np.random.Generator) -> None:
    """A noisy ellipse cut-out (a "photo"), flat-coloured for drawings, tiny for the too-small one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = (20, 24) if "tiny" in path.name else (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
    yy, xx = np.mgrid[:height, :width]
    inside = ((yy - height / 2) / (height / 2 - 3)) ** 2 + ((xx - width / 2) / (width / 2 - 3)) ** 2 <= 1
    if "drawn" in path.name:
        rgb = np.broadcast_to(np.array([200, 40, 40], np.uint8), (height, width, 3))
    else:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = np.where(inside, 255, 0).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    if description is not None:
        path.with_suffix(".txt").write_text(description + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def stamps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stamps")
    rng = np.random.default_rng(7)
    for relative, description in {**PHOTOS, **LEFT_OUT}.items():
        _write_stamp(root / relative, description, rng)
    _write_stamp(root / "food/fruit/banana_mirror.png", None, rng)  # no description: left out
    return root


@pytest.fixture(scope="module")
def dataset(stamps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scenes")
    return out, scenes.generate(out, COUNTS, seed=3, size=SIZE, stamps_dir=stamps_dir, progress=False)


@pytest.mark.parametrize("line, expected", [
    ("A red apple.", ("a", "red apple")),
    ("An owl.", ("an", "owl")),
    ("A ripe, red tomato!", ("a", "ripe red tomato")),
    ("A spiny lobster, from the Hawaiian islands.", ("a", "spiny lobster")),
    ("A peacock (a male peafowl).", ("a", "peacock")),
    ("A “Fuji” apple.", ("a", "fuji apple")),
    ("A ginger 'root'.", ("a", "ginger root")),
    ("A plumber’s wrench.", ("a", "plumber's wrench")),
    ("A candy cane is a traditional Christmas treat in the United States.", ("a", "candy cane")),
    ("A flower covered in dew drops.", ("a", "flower")),
    ("A wheelie bin! Give me your trash!", ("a", "wheelie bin")),
    ("Mars—the red planet.", None),
    ("The Sun.", None),
    ("Two wild boars.", None),
    ("Eat your broccoli!", None),
    ("A", None),
])
def test_clean_description(line: str, expected: tuple[str, str] | None) -> None:
    assert scenes.clean_description(line) == expected


@pytest.mark.parametrize("phrase, plural", [
    ("duck", "ducks"), ("red bus", "red buses"), ("pumpkin", "pumpkins"), ("cherry", "cherries"),
    ("key", "keys"), ("bunch of grapes", "bunches of grapes"), ("pair of open scissors", "pairs of open scissors"),
    ("mouse", "mice"), ("woodlouse", "woodlice"), ("sheep", "sheep"), ("butterflyfish", "butterflyfish"),
    ("ripe red tomato", "ripe red tomatoes"), ("knife", "knives"), ("fox", "foxes"),
])
def test_pluralize(phrase: str, plural: str) -> None:
    assert scenes.pluralize(phrase) == plural


def test_inventory_takes_photo_stamps_and_reserves_novel_categories(stamps_dir: Path) -> None:
    stamps = scenes.read_inventory(stamps_dir)
    assert [stamp.path for stamp in stamps] == sorted(PHOTOS)
    duck = next(stamp for stamp in stamps if stamp.path == "animals/birds/duck.png")
    assert (duck.category, duck.article, duck.phrase) == ("animals/birds", "a", "duck")
    known, novel = scenes.split_pools(stamps)
    novel_paths = {path for path in PHOTOS if scenes.in_categories(path.rsplit("/", 1)[0], NOVEL_CATEGORIES)}
    assert {stamp.path for stamp in novel} == novel_paths
    assert {stamp.path for stamp in known} == set(PHOTOS) - {s.path for s in novel} - {"plants/eggplant.png"}


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_missing_stamps_folder_says_how_to_install(tmp_path: Path, folder: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StampsNotFoundError, match="apt-get install tuxpaint-stamps-default"):
        scenes.generate(tmp_path / "out", COUNTS, stamps_dir=tmp_path / folder, progress=False)


def test_cli_reports_missing_stamps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert scenes.main(["--out", str(tmp_path / "out"), "--stamps", str(tmp_path / "none"), "--train", "1"]) == 2
    assert "apt-get install tuxpaint-stamps-default" in capsys.readouterr().err


def test_same_seed_gives_identical_json_and_another_seed_other_scenes(stamps_dir: Path, tmp_path: Path,
                                                                      dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    again = tmp_path / "again"
    assert scenes.main(["--out", str(again), "--stamps", str(stamps_dir), "--seed", "3", "--size", str(SIZE),
                        *[f"--{split}={count}" for split, count in COUNTS.items()]]) == 0
    assert (again / "dataset.json").read_bytes() == (out / "dataset.json").read_bytes()
    other = scenes.generate(tmp_path / "other", COUNTS, seed=4, size=SIZE, stamps_dir=stamps_dir, progress=False)
    first = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert [im["boxes"] for im in other["images"]] != [im["boxes"] for im in first["images"]]
    assert [im["sentences"] for im in other["images"]] != [im["sentences"] for im in first["images"]]


def test_overwrites_only_when_asked_and_leaves_no_stale_images(stamps_dir: Path, tmp_path: Path) -> None:
    scenes.generate(tmp_path, {"train": 3}, size=SIZE, stamps_dir=stamps_dir, progress=False)
    with pytest.raises(ScenesError, match="--overwrite"):
        scenes.generate(tmp_path, {"train": 1}, size=SIZE, stamps_dir=stamps_dir, progress=False)
    scenes.generate(tmp_path, {"train": 1}, size=SIZE, stamps_dir=stamps_dir, overwrite=True, progress=False)
    assert [path.name for path in (tmp_path / "images" / "train").iterdir()] == ["train-00000.jpg"]


def test_layout_files_and_karpathy_fields(dataset: tuple[Path, dict]) -> None:
    out, data = dataset
    assert json.loads((out / "dataset.json").read_text(encoding="utf-8")) == data
    assert "GPL-2" in (out / "LICENSE-DATA.md").read_text(encoding="utf-8")
    assert [sum(im["split"] == split for im in data["images"]) for split in COUNTS] == list(COUNTS.values())
    assert [im["imgid"] for im in data["images"]] == list(range(len(data["images"])))
    for image in data["images"]:
        assert image["filepath"] == f"images/{image['split']}"
        with Image.open(out / image["filepath"] / image["filename"]) as jpeg:
            assert (jpeg.format, jpeg.size) == ("JPEG", (SIZE, SIZE))
        assert len(image["objects"]) == len(image["boxes"]) == len(image["stamps"]) == len(image["categories"])
        assert 1 <= len(image["objects"]) <= scenes.MAX_OBJECTS


def test_five_distinct_captions_mention_every_object(dataset: tuple[Path, dict]) -> None:
    for image in dataset[1]["images"]:
        raws = [sentence["raw"] for sentence in image["sentences"]]
        assert len(raws) == len(set(raws)) == scenes.CAPTIONS_PER_IMAGE
        text = " | ".join(raws)
        for phrase in image["objects"]:
            assert re.search(rf"\b({re.escape(phrase)}|{re.escape(scenes.pluralize(phrase))})\b", text), (phrase, raws)


def test_boxes_are_where_the_cut_outs_are(dataset: tuple[Path, dict], stamps_dir: Path) -> None:
    """Re-draw every scene from its split's stream: its boxes are the JSON's and frame the alpha."""
    data = dataset[1]
    known, novel = scenes.split_pools(scenes.read_inventory(stamps_dir))
    images = scenes.StampImages(stamps_dir)
    for split in COUNTS:
        rng = scenes.split_rng(3, split)
        for record in [im for im in data["images"] if im["split"] == split]:
            scene = scenes.sample_scene(rng, novel if split == "test-novel" else known, SIZE, split)
            assert [sentence["raw"] for sentence in record["sentences"]] == [
                caption.text for caption in scenes.describe(rng, scene, SIZE, split)]
            assert [list(p.box) for p in scene.placements] == record["boxes"]
            _, masks = scenes.render_scene(scene, SIZE, images)
            for (x1, y1, x2, y2), mask in zip(record["boxes"], masks, strict=True):
                assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
                outside = mask.copy()
                outside[y1:y2, x1:x2] = 0
                assert not outside.any()
                ys, xs = np.nonzero(mask >= scenes.ALPHA_THRESHOLD)
                assert abs(xs.min() - x1) <= 1 and abs(ys.min() - y1) <= 1
                assert abs(xs.max() + 1 - x2) <= 1 and abs(ys.max() + 1 - y2) <= 1
            for i, a in enumerate(record["boxes"]):
                for b in record["boxes"][i + 1:]:
                    assert layout._apart(tuple(a), tuple(b), 1)


def test_test_novel_shares_no_category_object_or_template_with_training(dataset: tuple[Path, dict]) -> None:
    images = dataset[1]["images"]
    assert not set(SEEN_TEMPLATES) & set(NOVEL_TEMPLATES)
    novel = [im for im in images if im["split"] == "test-novel"]
    seen = [im for im in images if im["split"] != "test-novel"]
    novel_objects = {phrase for im in novel for phrase in im["objects"]}
    for image in novel:
        assert all(scenes.in_categories(c, NOVEL_CATEGORIES) for c in image["categories"])
        assert {s["template"] for s in image["sentences"]} <= set(NOVEL_TEMPLATES)
    for image in seen:
        assert not any(scenes.in_categories(c, NOVEL_CATEGORIES) for c in image["categories"])
        assert {s["template"] for s in image["sentences"]} <= set(SEEN_TEMPLATES)
        assert not set(image["objects"]) & novel_objects


def test_splits_share_no_scene_and_no_group_of_objects(dataset: tuple[Path, dict]) -> None:
    images = dataset[1]["images"]
    assert len({(im["filepath"], im["filename"]) for im in images}) == len(images)
    by_split: dict[str, set] = {split: set() for split in COUNTS}
    groups: dict[str, set] = {split: set() for split in COUNTS}
    for image in images:
        by_split[image["split"]].add(json.dumps([image["stamps"], image["boxes"], image["background"]]))
        if len(set(image["stamps"])) > 1:
            groups[image["split"]].add(tuple(sorted(set(image["stamps"]))))
    for split in ("dev", "test", "test-novel"):
        assert not by_split[split] & by_split["train"]
    assert not (groups["dev"] | groups["test"]) & groups["train"]


def _stamp(category: str, phrase: str = "duck") -> Stamp:
    return Stamp(f"{category}/{phrase}.png", category, "a", phrase, (0, 0, 100, 100))


def _captions(placements: list[Placement], templates: dict, size: int = 200) -> set[str]:
    scene = Scene(Background("white", "on white", "white", (255, 255, 255)), (1.0, 0.0, 0.0, False),
                  tuple(placements))
    return {caption.text for caption in scenes.caption_candidates(scenes.View.of(scene, size), templates)}


def test_captions_state_only_what_the_boxes_show() -> None:
    duck, bus = _stamp("animals/birds", "duck"), _stamp("vehicles", "green bus")
    left, right = Placement(duck, (10, 80, 90, 160)), Placement(bus, (110, 90, 150, 130))
    seen = _captions([right, left], SEEN_TEMPLATES)
    assert {"a duck to the left of a green bus", "a duck and a green bus", "a large duck and a small green bus",
            "a large duck on the left side of the picture", "a small green bus on the right side of the picture"
            } <= seen
    assert not {c for c in seen if "green bus to the left" in c or " above " in c}
    novel = _captions([right, left], NOVEL_TEMPLATES)
    assert {"a green bus to the right of a duck", "a duck next to a green bus",
            "a duck that is bigger than a green bus", "a big duck and a tiny green bus",
            "there is a duck and a green bus"} <= novel
    assert not {c for c in novel if "duck to the right" in c or " below " in c}
    stacked = _captions([Placement(duck, (80, 10, 120, 50)), Placement(bus, (70, 120, 130, 180))], NOVEL_TEMPLATES)
    assert "a green bus below a duck" in stacked and "a tiny duck at the top of the picture" in stacked
    twins = _captions([Placement(duck, (10, 10, 50, 50)), Placement(duck, (100, 100, 140, 140))], SEEN_TEMPLATES)
    assert {"two ducks", "a photo of two ducks", "two objects: two ducks", "two small ducks"} <= twins
    unlike = _captions([Placement(duck, (10, 10, 50, 50)), Placement(duck, (100, 100, 190, 190))], NOVEL_TEMPLATES)
    assert {"a pair of ducks", "a tiny duck and a big duck", "there are two ducks"} <= unlike
    assert not {c for c in twins if "to the left of" in c}


def test_size_words_in_a_phrase_get_no_size_caption() -> None:
    pumpkin = _stamp("food/vegetables", "very small pumpkin")
    captions = _captions([Placement(pumpkin, (10, 10, 110, 110)), Placement(pumpkin, (120, 120, 160, 160))],
                         SEEN_TEMPLATES)
    assert "two very small pumpkins" in captions
    assert not {c for c in captions if "large" in c or "small very" in c}


REAL_STAMPS = scenes.DEFAULT_STAMPS_DIR


@pytest.mark.skipif(not REAL_STAMPS.is_dir(), reason="Debian's tuxpaint-stamps-default is not installed")
def test_real_stamps_inventory_and_scenes(tmp_path: Path) -> None:
    stamps = scenes.read_inventory(REAL_STAMPS)
    known, novel = scenes.split_pools(stamps)
    assert len(stamps) > 250 and len({stamp.category for stamp in stamps}) > 40
    assert 0.12 <= len(novel) / len(stamps) <= 0.22
    assert all(re.fullmatch(r"[a-z][a-z0-9' -]*", stamp.phrase) for stamp in stamps)
    assert not {stamp.key for stamp in known} & {stamp.key for stamp in novel}
    data = scenes.generate(tmp_path, {"train": 6, "dev": 2, "test": 2, "test-novel": 4}, size=192, progress=False)
    assert all(len(image["sentences"]) == scenes.CAPTIONS_PER_IMAGE for image in data["images"])
