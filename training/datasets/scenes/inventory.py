"""What scenes are made of: the usable photo stamps (read from the stamps folder) and the backgrounds.

A stamp is usable when it is a photo of an object with a description that cleans into a noun
phrase (see the package docstring); :func:`split_pools` sets the novel categories' stamps apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from training.datasets.scenes.english import clean_description, has_size_word, pluralize

DEFAULT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
INSTALL_HINT = "install Debian's tuxpaint-stamps-default: apt-get install tuxpaint-stamps-default"

# Which stamps are photos of objects.
PHOTO_TOP_LEVEL = ("animals", "clothes", "food", "hobbies", "household", "medical", "plants", "seasonal",
                   "sports", "town", "vehicles")
DRAWING_FOLDERS = ("cartoon", "flags", "roadsigns")
ALPHA_THRESHOLD = 32  # the cut-out is where alpha >= this; fainter pixels are shadows and halos
MIN_STAMP_SIDE = 40
MAX_FLAT_FRACTION = 0.3
# Whole folders (with their subfolders) reserved for test-novel, chosen once by hand so that each is
# a kind of thing the other splits never show; they hold about 17% of the stamps used.
NOVEL_CATEGORIES = ("animals/fish", "animals/mammals/bovines", "food/vegetables", "hobbies/music")


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
        return has_size_word(self.phrase)


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
