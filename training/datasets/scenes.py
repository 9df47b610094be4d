"""Offline image-caption scenes: real photo cut-outs on real photo or plain backgrounds, 5 captions each.

Usage::

    python -m training.datasets.scenes --out DIR [--seed 0] [--train 3000] [--dev 300] [--test 300]
        [--test-novel 300] [--size 384] [--stamps /usr/share/tuxpaint/stamps] [--overwrite]

Objects come from Debian's ``tuxpaint-stamps-default`` (``apt-get install tuxpaint-stamps-default``):
PNG cut-outs, most of them photos, each with a ``.txt`` whose first line is a short human-written
English description ("A red apple."). A scene pastes 1-4 of them, at small or large sizes and without
overlap, onto a background, and gets 5 captions that are true of it: the objects' own phrases with
counts ("two pumpkins"), sizes ("a large duck and a small green bus"), relations ("a duck to the left
of a green bus"), the side of the picture they are on, and the background ("... on grass").

Written to ``DIR``:

=================================  ======================================================================
``images/{split}/{id}.jpg``        the scenes, ``--size`` pixels square, JPEG quality 90
``dataset.json``                   Karpathy-style: ``{"images": [{"imgid", "split", "filepath",
                                   "filename", "sentences": [{"raw", "tokens", "template", ...}],
                                   "objects", "boxes", "stamps", "categories", "background"}]}``;
                                   ``boxes`` are ``[x1, y1, x2, y2]`` pixels of the object's cut-out
                                   in the image, in the order of ``objects``; ``python -m
                                   training.extract --images DIR --captions DIR/dataset.json`` reads it
``LICENSE-DATA.md``                the licences of everything the images and captions are made of
=================================  ======================================================================

Splits: ``train``, ``dev`` and ``test`` are new scenes of the same objects; a group of two or more
different objects that appears together in a dev or test image never appears together in train
(groups are assigned to a split by a hash of their stamps). ``test-novel`` measures generalisation:
its objects come only from the categories in ``NOVEL_CATEGORIES`` (whole stamp folders, about 17% of
the stamps; none of them, nor any object sharing a head noun with them, appears in the other splits)
and its captions only from ``NOVEL_TEMPLATES``, whose sentence forms and words ("there is", "you can
see", "below", "to the right of", "next to", "bigger than", "at the top of", "big", "tiny", "a pair
of") the other splits never use. Every caption records its template id.

Which stamps are used (``read_inventory``): PNGs with a ``.txt`` under the top-level folders in
``PHOTO_TOP_LEVEL`` (objects, animals, food, vehicles; not symbols, letters, people, weapons,
planets or fire), outside folders named in ``DRAWING_FOLDERS``; not "colorable" (a ``.dat`` saying so
marks a one-colour silhouette); whose cut-out is at least ``MIN_STAMP_SIDE`` pixels; that look like a
photo (drawn clip art has flat fills: at most ``MAX_FLAT_FRACTION`` of neighbouring opaque pixels may
have the identical colour); and whose description cleans into a short noun phrase with an indefinite
article (``clean_description``: "A ripe, red tomato!" -> "a" + "ripe red tomato"; "The Sun." and
"Eat your broccoli!" are left out).

Determinism: each split draws from ``numpy.random.default_rng([seed, crc32(split)])``, stamp folders
are walked in sorted order, and nothing depends on hash or set order, so the same seed, sizes and
stamp package give a byte-identical ``dataset.json`` (the JPEG bytes may also depend on the Pillow
version).

Licences: the stamps are GPL-2-or-later (Tux Paint, Bill Kendrick et al.), so the images and captions
made from them are too; never commit them. Backgrounds: CC0 textures and a public-domain NASA photo
from scikit-image's sample data, or plain colours (see ``BACKGROUNDS`` and the written
``LICENSE-DATA.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shutil
import sys
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

DEFAULT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
INSTALL_HINT = "install Debian's tuxpaint-stamps-default: apt-get install tuxpaint-stamps-default"
SPLITS = ("train", "dev", "test", "test-novel")
CAPTIONS_PER_IMAGE = 5
JPEG_QUALITY = 90
MIN_IMAGE_SIZE = 128

# --- which stamps are photos of objects -------------------------------------------------------------
PHOTO_TOP_LEVEL = ("animals", "clothes", "food", "hobbies", "household", "medical", "plants", "seasonal",
                   "sports", "town", "vehicles")
DRAWING_FOLDERS = ("cartoon", "flags", "roadsigns")
ALPHA_THRESHOLD = 32  # the cut-out is where alpha >= this; fainter pixels are shadows and halos
MIN_STAMP_SIDE = 40
MAX_FLAT_FRACTION = 0.3
# Whole folders (with their subfolders) reserved for test-novel, chosen once by hand so that each is
# a kind of thing the other splits never show; they hold about 17% of the stamps used.
NOVEL_CATEGORIES = ("animals/fish", "animals/mammals/bovines", "food/vegetables", "hobbies/music")

# --- descriptions -> noun phrases ---------------------------------------------------------------------
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_PHRASE_END = re.compile(r"[(\u2014\u2013:;]| - ")
# Words that start a clause, a prepositional phrase or a second noun phrase after the head noun:
# "A candy cane is ...", "A walnut in its shell", "A hoverfly resembles a honeybee drone".
_CLAUSE_WORDS = frozenset({"is", "are", "was", "lets", "resembles", "carries", "means", "like", "in", "with",
                           "from", "at", "inside", "on", "for", "to", "that", "which", "who", "also",
                           "called", "making", "a", "an", "the"})
_PHRASE = re.compile(r"[a-z][a-z0-9'-]*(?: [a-z0-9'-]+)*")
MAX_PHRASE_WORDS = 5
_SIZE_WORDS = frozenset({"small", "large", "little", "big", "tiny", "huge", "giant", "mini"})
_INVARIANT_PLURALS = ("sheep", "deer", "fish", "bison", "moose", "shrimp", "trout", "swine", "aircraft",
                      "species", "series", "cattle", "salmon", "elk")
_IRREGULAR_PLURALS = {"mouse": "mice", "louse": "lice", "goose": "geese", "tooth": "teeth", "foot": "feet",
                      "man": "men", "woman": "women", "child": "children", "ox": "oxen", "knife": "knives",
                      "leaf": "leaves", "wolf": "wolves", "calf": "calves", "half": "halves", "loaf": "loaves",
                      "shelf": "shelves", "potato": "potatoes", "tomato": "tomatoes", "mango": "mangoes",
                      "buffalo": "buffaloes", "cactus": "cacti"}
# Compound words ending in these ("butterflyfish", "woodlouse") inflect like them.
_PLURAL_SUFFIXES = ("fish", "sheep", "deer", "mouse", "louse", "goose")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

# --- scene layout, as fractions of the image side -----------------------------------------------------
MAX_OBJECTS = 4
# An object's scale is the side of the square of its area, so that a bassoon is as visible as a ball.
SMALL_SCALE = (0.13, 0.22)  # a "small" object
LARGE_SCALE = (0.34, 0.46)  # a "large" one; no object is longer than the image less its margins
SMALL_LONG_SIDE = 0.3       # the longest a "small" object may be
LARGE_PROBABILITY = (0.0, 0.5, 0.35, 0.25, 0.15)  # by number of objects
REPEAT_PROBABILITY = 0.3    # chance that one stamp appears 2-4 times (for count captions)
MARGIN = 0.02               # from the image border
GAP = 0.03                  # between two objects' boxes, so that relations are clear-cut
NEAR = 0.25                 # "next to": at most this far apart horizontally
LAYOUT_ATTEMPTS = 12
POSITION_ATTEMPTS = 60
COMPOSITION_DRAWS = 1000


class StampsNotFoundError(FileNotFoundError):
    """The stamps folder is missing or holds no usable photo stamps; the message says what to do."""


class ScenesError(ValueError):
    """Arguments or an output folder the generator cannot use; the message says what to do."""


@dataclass(frozen=True)
class Stamp:
    """One photo cut-out: its PNG (relative to the stamps folder), folder, description and alpha box."""

    path: str
    category: str
    article: str
    phrase: str
    crop: tuple[int, int, int, int]

    @property
    def width(self) -> int:
        return self.crop[2] - self.crop[0]

    @property
    def height(self) -> int:
        return self.crop[3] - self.crop[1]

    @property
    def key(self) -> str:
        """The last word ("apple" of "red apple"): two stamps with the same key never share a scene."""
        return self.phrase.split()[-1]

    @property
    def plural(self) -> str:
        return pluralize(self.phrase)

    @property
    def has_size_word(self) -> bool:
        """"very small pitcher" already states a size: size captions would contradict it."""
        return any(word in _SIZE_WORDS for word in self.phrase.split())


@dataclass(frozen=True)
class Background:
    """A background: a scikit-image sample photo (tinted when grey) or a plain colour."""

    name: str
    on_phrase: str  # seen captions: "{things} on grass"
    noun: str       # novel captions: "grass behind {things}"
    color: tuple[int, int, int]  # the plain colour, or the tint of a grey photo
    photo: str | None = None     # skimage.data function
    source: str = "a plain colour, made by the generator; no third-party material"
    licence: str = "none needed"


BACKGROUNDS = (
    Background("grass", "on grass", "grass", (96, 150, 58), "grass",
               "scikit-image `skimage.data.grass()`, from deviantart.com/linolafett/art/Grass-01-434853879 "
               "(grey; tinted green here)", "CC0 1.0"),
    Background("gravel", "on gravel", "gravel", (158, 148, 132), "gravel",
               "scikit-image `skimage.data.gravel()`, from cc0textures.com (Gravel04; grey, tinted here)",
               "CC0 1.0"),
    Background("brick", "in front of a brick wall", "a brick wall", (178, 96, 70), "brick",
               "scikit-image `skimage.data.brick()`, from cc0textures.com (Bricks25; grey, tinted here)",
               "CC0 1.0"),
    Background("starry-sky", "against a starry sky", "a starry sky", (255, 255, 255), "hubble_deep_field",
               "scikit-image `skimage.data.hubble_deep_field()`, the Hubble eXtreme Deep Field, NASA",
               "public domain (NASA media guidelines)"),
    Background("white", "on a plain white background", "a plain white background", (246, 246, 244)),
    Background("light-grey", "on a plain light grey background", "a plain light grey background",
               (196, 198, 200)),
    Background("light-blue", "on a plain light blue background", "a plain light blue background",
               (168, 200, 236)),
    Background("pale-yellow", "on a plain pale yellow background", "a plain pale yellow background",
               (244, 234, 178)),
)
_BACKGROUNDS_BY_NAME = {background.name: background for background in BACKGROUNDS}


# --- inventory --------------------------------------------------------------------------------------
def clean_description(line: str) -> tuple[str, str] | None:
    """``(article, noun phrase)`` of a stamp description's first line, or None if it is not one.

    "A ripe, red tomato!" -> ("a", "ripe red tomato"); "A peacock (a male peafowl)." -> ("a",
    "peacock"); "A candy cane is a traditional ..." -> ("a", "candy cane"). Descriptions that do not
    start with "A"/"An" (names, plurals, "The Sun.", "Eat your broccoli!") give None, as do phrases
    longer than ``MAX_PHRASE_WORDS`` words or with characters other than letters, digits, ``'``, ``-``.
    """
    text = line.strip().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"[\"\u201c\u201d]", "", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", "", text)  # quotes around a word, not apostrophes
    text = _SENTENCE_END.split(text, maxsplit=1)[0]
    text = _PHRASE_END.split(text, maxsplit=1)[0]
    text = _join_adjective_commas(text).lower()
    words = text.split()
    if len(words) < 2 or words[0] not in ("a", "an"):
        return None
    phrase_words = list(itertools.takewhile(lambda word: word not in _CLAUSE_WORDS, words[1:]))
    if len(phrase_words) < len(words) - 1:
        # A participle that led into the cut clause: "a flower covered [in dew drops]".
        while len(phrase_words) > 1 and phrase_words[-1].endswith(("ed", "ing")):
            phrase_words.pop()
    phrase = " ".join(phrase_words)
    if not 1 <= len(phrase_words) <= MAX_PHRASE_WORDS or not _PHRASE.fullmatch(phrase):
        return None
    return words[0], phrase


def _join_adjective_commas(text: str) -> str:
    """Drop a comma between adjectives ("a ripe, red tomato"); cut at any other ("a lobster, from ...")."""
    head, comma, tail = text.partition(",")
    if not comma:
        return text
    tail_words = tail.lower().split()
    if tail_words and len(tail_words) <= 3 and not any(word in _CLAUSE_WORDS for word in tail_words):
        return _join_adjective_commas(f"{head} {tail.strip()}")
    return head


def pluralize(phrase: str) -> str:
    """English plural of a noun phrase: its head noun (the word before "of", else the last) inflected."""
    words = phrase.split()
    head = words.index("of") - 1 if "of" in words[1:] else len(words) - 1
    words[head] = _plural_word(words[head])
    return " ".join(words)


def _plural_word(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word in _INVARIANT_PLURALS:
        return word
    for suffix in _PLURAL_SUFFIXES:
        if word.endswith(suffix):
            return word[: -len(suffix)] + _plural_word(suffix)
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    return word + "s"


def alpha_box(alpha: np.ndarray, threshold: int = ALPHA_THRESHOLD) -> tuple[int, int, int, int] | None:
    """``(x1, y1, x2, y2)`` (exclusive ends) around the pixels with ``alpha >= threshold``, or None."""
    rows = np.flatnonzero((alpha >= threshold).any(axis=1))
    cols = np.flatnonzero((alpha >= threshold).any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def looks_like_photo(rgba: np.ndarray) -> bool:
    """Whether an RGBA cut-out is a photo rather than clip art, which is made of flat colour fills."""
    opaque = rgba[..., 3] == 255
    pairs = opaque[:, 1:] & opaque[:, :-1]
    if not pairs.any():
        return True  # translucent objects (a glass of water) are photos, clip art is opaque
    same = (rgba[:, 1:, :3] == rgba[:, :-1, :3]).all(axis=-1) & pairs
    return same.sum() / pairs.sum() <= MAX_FLAT_FRACTION


def read_inventory(stamps_dir: str | Path = DEFAULT_STAMPS_DIR) -> list[Stamp]:
    """Every usable photo stamp under ``stamps_dir``, sorted by path (see the module docstring).

    Raises:
        StampsNotFoundError: the folder does not exist or holds no usable stamp.
    """
    root = Path(stamps_dir)
    if not root.is_dir():
        raise StampsNotFoundError(f"stamps folder {root} does not exist; {INSTALL_HINT}, or pass --stamps DIR")
    pngs = sorted(root.rglob("*.png"), key=lambda path: path.relative_to(root).as_posix())
    stamps = [stamp for stamp in (_read_stamp(root, png) for png in pngs) if stamp is not None]
    if not stamps:
        raise StampsNotFoundError(
            f"no usable photo stamps under {root} (PNG + .txt description in {', '.join(PHOTO_TOP_LEVEL)}); "
            f"{INSTALL_HINT}, or pass --stamps DIR")
    return stamps


def _read_stamp(root: Path, png: Path) -> Stamp | None:
    folders = png.relative_to(root).parts[:-1]
    if not folders or folders[0] not in PHOTO_TOP_LEVEL or any(f in DRAWING_FOLDERS for f in folders):
        return None
    description, settings = png.with_suffix(".txt"), png.with_suffix(".dat")
    if not description.is_file():
        return None  # tuxpaint's "_mirror" variants and sound-only entries have no description
    if settings.is_file() and "colorable" in settings.read_text(encoding="utf-8", errors="replace").split():
        return None
    lines = description.read_text(encoding="utf-8", errors="replace").splitlines()
    described = clean_description(lines[0]) if lines else None
    if described is None:
        return None
    article, phrase = described
    with Image.open(png) as image:
        rgba = np.asarray(image.convert("RGBA"))
    crop = alpha_box(rgba[..., 3])
    if crop is None or max(crop[2] - crop[0], crop[3] - crop[1]) < MIN_STAMP_SIDE:
        return None
    if not looks_like_photo(rgba[crop[1]:crop[3], crop[0]:crop[2]]):
        return None
    return Stamp(png.relative_to(root).as_posix(), "/".join(folders), article, phrase, crop)


def in_categories(category: str, categories: Sequence[str]) -> bool:
    """Whether the stamp folder ``category`` is one of ``categories`` or lies below one."""
    return any(category == c or category.startswith(c + "/") for c in categories)


def split_pools(stamps: Sequence[Stamp], novel_categories: Sequence[str] = NOVEL_CATEGORIES
                ) -> tuple[list[Stamp], list[Stamp]]:
    """``(known, novel)`` stamps: novel are those in ``novel_categories``; known are the others, less
    any that shares a head noun with a novel one ("eggplant" of a plant vs the vegetable)."""
    novel = [stamp for stamp in stamps if in_categories(stamp.category, novel_categories)]
    novel_keys = {stamp.key for stamp in novel}
    known = [stamp for stamp in stamps
             if not in_categories(stamp.category, novel_categories) and stamp.key not in novel_keys]
    return known, novel


# --- scenes -----------------------------------------------------------------------------------------
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


# --- what is true of a scene --------------------------------------------------------------------------
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
    return "left" if box[2] <= size / 2 else "right" if box[0] >= size / 2 else None


def vertical_half(box: Box, size: int) -> str | None:
    return "top" if box[3] <= size / 2 else "bottom" if box[1] >= size / 2 else None


# --- captions -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caption:
    """A caption, the template that made it and the object phrases it mentions."""

    template: str
    text: str
    mentions: tuple[str, ...]


# Size adjectives by size class: the seen splits' and test-novel's.
SEEN_SIZE_WORDS = {"large": "large", "small": "small"}
NOVEL_SIZE_WORDS = {"large": "big", "small": "tiny"}


def size_word(placement: Placement, size: int, words: dict[str, str]) -> str | None:
    """The adjective ``words`` give the object's size class, unless its phrase states a size already
    ("very small pitcher") or it is between the classes."""
    return None if placement.stamp.has_size_word else words.get(size_class(placement.box, size) or "")


def noun_group(stamp: Stamp, count: int, adjective: str | None = None) -> str:
    """"a duck", "an owl", "a small duck", "two small ducks"."""
    if count == 1:
        return f"a {adjective} {stamp.phrase}" if adjective else f"{stamp.article} {stamp.phrase}"
    return " ".join(filter(None, (NUMBER_WORDS[count], adjective, stamp.plural)))


def join_words(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


@dataclass(frozen=True)
class View:
    """A scene as templates see it: objects left to right, the image side and the background."""

    objects: tuple[Placement, ...]
    size: int
    background: Background

    @classmethod
    def of(cls, scene: Scene, size: int) -> View:
        ordered = sorted(scene.placements, key=lambda p: (p.box[0], p.box[1]))
        return cls(tuple(ordered), size, scene.background)

    def groups(self, words: dict[str, str] | None = None) -> list[tuple[Stamp, int, str | None]]:
        """``(stamp, count, adjective)`` for each different phrase (and, given size ``words``, size
        adjective), in order of first appearance from the left."""
        counts: dict[tuple[str, str | None], int] = {}
        stamps: dict[str, Stamp] = {}
        for placement in self.objects:
            key = (placement.stamp.phrase, size_word(placement, self.size, words) if words else None)
            counts[key] = counts.get(key, 0) + 1
            stamps.setdefault(placement.stamp.phrase, placement.stamp)
        return [(stamps[phrase], count, adjective) for (phrase, adjective), count in counts.items()]

    def things(self, words: dict[str, str] | None = None) -> str:
        """All the objects: "a duck, two pumpkins and a green bus" (with ``words``: "a small duck, ...")."""
        return join_words([noun_group(stamp, count, adjective) for stamp, count, adjective in self.groups(words)])

    def phrases(self) -> tuple[str, ...]:
        return tuple(stamp.phrase for stamp, _, _ in self.groups())


Template = Callable[[View], Iterator[Caption]]


def scene_template(name: str, form: Callable[[View, str], str]) -> Template:
    """A caption about the whole scene: ``form(view, things)``; mentions every object."""
    def captions(view: View) -> Iterator[Caption]:
        yield Caption(name, form(view, view.things()), view.phrases())
    return captions


def sized_scene_template(name: str, words: dict[str, str]) -> Template:
    """All the objects with their size adjectives ("a large duck and two small pumpkins"), if any has one."""
    def captions(view: View) -> Iterator[Caption]:
        if any(size_word(placement, view.size, words) for placement in view.objects):
            yield Caption(name, view.things(words), view.phrases())
    return captions


def pair_template(name: str, holds: Callable[[Box, Box, int], bool], form: str) -> Template:
    """``form.format(a=..., b=...)`` for every two objects of different phrases where ``holds``."""
    def captions(view: View) -> Iterator[Caption]:
        for a in view.objects:
            for b in view.objects:
                if a.stamp.phrase != b.stamp.phrase and holds(a.box, b.box, view.size):
                    text = form.format(a=noun_group(a.stamp, 1), b=noun_group(b.stamp, 1))
                    yield Caption(name, text, (a.stamp.phrase, b.stamp.phrase))
    return captions


def place_template(name: str, half: Callable[[Box, int], str | None], form: str, words: dict[str, str]
                   ) -> Template:
    """``form.format(thing=..., half=...)`` for every object wholly in one half of the picture, with
    its size adjective: "a small duck on the left side of the picture"."""
    def captions(view: View) -> Iterator[Caption]:
        for placement in view.objects:
            where = half(placement.box, view.size)
            if where is not None:
                thing = noun_group(placement.stamp, 1, size_word(placement, view.size, words))
                yield Caption(name, form.format(thing=thing, half=where), (placement.stamp.phrase,))
    return captions


def group_template(name: str, describe: Callable[[Stamp, int], str | None]) -> Template:
    """``describe(stamp, count)`` for every different phrase it has something true to say about."""
    def captions(view: View) -> Iterator[Caption]:
        for stamp, count, _ in view.groups():
            text = describe(stamp, count)
            if text is not None:
                yield Caption(name, text, (stamp.phrase,))
    return captions


def _objects(count: int) -> str:
    return f"{NUMBER_WORDS[count]} object{'s' if count > 1 else ''}"


def _is_are(view: View) -> str:
    return "is" if view.groups()[0][1] == 1 else "are"


def _group_of(stamp: Stamp, count: int) -> str | None:
    if count < 2:
        return None
    return f"a pair of {stamp.plural}" if count == 2 else f"a group of {NUMBER_WORDS[count]} {stamp.plural}"


SEEN_TEMPLATES: dict[str, Template] = {
    "list": scene_template("list", lambda view, things: things),
    "photo-of": scene_template("photo-of", lambda view, things: f"a photo of {things}"),
    "scene-with": scene_template("scene-with", lambda view, things: f"a scene with {things}"),
    "on-background": scene_template("on-background", lambda view, things: f"{things} {view.background.on_phrase}"),
    "object-count": scene_template("object-count", lambda view, things: f"{_objects(len(view.objects))}: {things}"),
    "sizes": sized_scene_template("sizes", SEEN_SIZE_WORDS),
    "left-of": pair_template("left-of", left_of, "{a} to the left of {b}"),
    "above": pair_template("above", above, "{a} above {b}"),
    "picture-side": place_template("picture-side", horizontal_half, "{thing} on the {half} side of the picture",
                                   SEEN_SIZE_WORDS),
    "count": group_template("count", lambda stamp, n: f"{NUMBER_WORDS[n]} {stamp.plural}" if n > 1 else None),
}
NOVEL_TEMPLATES: dict[str, Template] = {
    "there-is": scene_template("there-is", lambda view, things: f"there {_is_are(view)} {things}"),
    "picture-with": scene_template("picture-with", lambda view, things: f"a picture with {things}"),
    "you-can-see": scene_template("you-can-see", lambda view, things: f"you can see {things}"),
    "behind": scene_template("behind", lambda view, things: f"{view.background.noun} behind {things}"),
    "in-total": scene_template("in-total", lambda view, things: f"{things}, {_objects(len(view.objects))} in total"),
    "big-tiny": sized_scene_template("big-tiny", NOVEL_SIZE_WORDS),
    "right-of": pair_template("right-of", lambda a, b, size: left_of(b, a, size), "{a} to the right of {b}"),
    "below": pair_template("below", lambda a, b, size: above(b, a, size), "{a} below {b}"),
    "next-to": pair_template("next-to", next_to, "{a} next to {b}"),
    "bigger-than": pair_template("bigger-than", bigger, "{a} that is bigger than {b}"),
    "top-bottom": place_template("top-bottom", vertical_half, "{thing} at the {half} of the picture",
                                 NOVEL_SIZE_WORDS),
    "group-of": group_template("group-of", _group_of),
}


def templates_for(split: str) -> dict[str, Template]:
    return NOVEL_TEMPLATES if split == "test-novel" else SEEN_TEMPLATES


def caption_candidates(view: View, templates: dict[str, Template]) -> list[Caption]:
    """Every caption the templates make for the scene, without duplicate texts, in a fixed order."""
    unique: dict[str, Caption] = {}
    for template in templates.values():
        for caption in template(view):
            unique.setdefault(caption.text, caption)
    return list(unique.values())


def choose_captions(rng: np.random.Generator, candidates: Sequence[Caption], phrases: Sequence[str],
                    count: int = CAPTIONS_PER_IMAGE) -> list[Caption]:
    """``count`` different captions that together mention every phrase, favouring unused templates."""
    if len(candidates) < count:
        raise ScenesError(f"only {len(candidates)} different captions for a scene of {list(phrases)}")
    chosen: list[Caption] = []
    while len(chosen) < count:
        covered = {phrase for caption in chosen for phrase in caption.mentions}
        used = {caption.template for caption in chosen}
        options = [caption for caption in candidates if caption not in chosen]
        options = [c for c in options if any(p not in covered for p in c.mentions)] or options
        options = [c for c in options if c.template not in used] or options
        chosen.append(options[int(rng.integers(len(options)))])
    return [chosen[int(i)] for i in rng.permutation(count)]


def describe(rng: np.random.Generator, scene: Scene, size: int, split: str) -> list[Caption]:
    """The 5 captions of a scene of ``split``."""
    view = View.of(scene, size)
    return choose_captions(rng, caption_candidates(view, templates_for(split)), view.phrases())


# --- drawing ------------------------------------------------------------------------------------------
@cache
def _photo(name: str) -> np.ndarray:
    """A scikit-image sample photo, as float32 in [0, 1] (grey, or RGB)."""
    import skimage.data  # only the drawing needs scikit-image

    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def background_pixels(background: Background, crop: tuple[float, float, float, bool], size: int) -> np.ndarray:
    """The ``size`` square RGB uint8 background: the photo's crop (tinted if grey), or the plain colour."""
    color = np.asarray(background.color, np.float32)
    if background.photo is None:
        return np.broadcast_to(color.astype(np.uint8), (size, size, 3)).copy()
    photo = _photo(background.photo)
    side_fraction, x_fraction, y_fraction, mirrored = crop
    side = max(1, round(side_fraction * min(photo.shape[:2])))
    x, y = round(x_fraction * (photo.shape[1] - side)), round(y_fraction * (photo.shape[0] - side))
    patch = photo[y:y + side, x:x + side]
    if patch.ndim == 2:
        # Grey texture -> the tint at mid grey, brighter and darker around it.
        patch = np.clip(patch[..., None] * 2.0 * color[None, None, :] / 255.0, 0.0, 1.0)
    image = Image.fromarray((patch * 255.0 + 0.5).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else image).copy()


class StampImages:
    """Cropped cut-outs of the stamps, read once each (premultiplied, so resizing keeps edges clean)."""

    def __init__(self, stamps_dir: str | Path = DEFAULT_STAMPS_DIR) -> None:
        self.root = Path(stamps_dir)
        self._images: dict[str, Image.Image] = {}

    def get(self, stamp: Stamp) -> Image.Image:
        if stamp.path not in self._images:
            with Image.open(self.root / stamp.path) as image:
                self._images[stamp.path] = image.convert("RGBA").crop(stamp.crop).convert("RGBa")
        return self._images[stamp.path]


def render_scene(scene: Scene, size: int, images: StampImages) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene's RGB image and, per placement, its alpha in the image (``size x size`` uint8)."""
    canvas = Image.fromarray(background_pixels(scene.background, scene.crop, size))
    masks = []
    for placement in scene.placements:
        x1, y1, x2, y2 = placement.box
        sprite = images.get(placement.stamp).resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS).convert("RGBA")
        canvas.paste(sprite, (x1, y1), sprite)
        mask = np.zeros((size, size), np.uint8)
        mask[y1:y2, x1:x2] = np.asarray(sprite)[..., 3]
        masks.append(mask)
    return canvas, masks


# --- the dataset --------------------------------------------------------------------------------------
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
    parser = argparse.ArgumentParser(prog="python -m training.datasets.scenes",
                                     description=__doc__.split("\n\n")[0],
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


if __name__ == "__main__":
    sys.exit(main())
