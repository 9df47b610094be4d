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

from training.data import CAPTIONS_PER_IMAGE
from training.datasets.scenes.captions import (
    NOVEL_TEMPLATES,
    SEEN_TEMPLATES,
    Caption,
    View,
    caption_candidates,
    describe,
)
from training.datasets.scenes.english import MAX_PHRASE_WORDS, clean_description, pluralize
from training.datasets.scenes.inventory import (
    ALPHA_THRESHOLD,
    BACKGROUNDS,
    DEFAULT_STAMPS_DIR,
    DRAWING_FOLDERS,
    MAX_FLAT_FRACTION,
    MIN_STAMP_SIDE,
    NOVEL_CATEGORIES,
    PHOTO_TOP_LEVEL,
    Background,
    ScenesError,
    Stamp,
    StampsNotFoundError,
    in_categories,
    read_inventory,
    split_pools,
)
from training.datasets.scenes.layout import MAX_OBJECTS, Placement, Scene, sample_scene, split_rng
from training.datasets.scenes.rendering import StampImages, render_scene
from training.datasets.scenes.writing import SPLITS, generate, main

__all__ = [
    "ALPHA_THRESHOLD",
    "BACKGROUNDS",
    "CAPTIONS_PER_IMAGE",
    "DEFAULT_STAMPS_DIR",
    "DRAWING_FOLDERS",
    "MAX_FLAT_FRACTION",
    "MAX_OBJECTS",
    "MAX_PHRASE_WORDS",
    "MIN_STAMP_SIDE",
    "NOVEL_CATEGORIES",
    "NOVEL_TEMPLATES",
    "PHOTO_TOP_LEVEL",
    "SEEN_TEMPLATES",
    "SPLITS",
    "Background",
    "Caption",
    "Placement",
    "Scene",
    "ScenesError",
    "Stamp",
    "StampImages",
    "StampsNotFoundError",
    "View",
    "caption_candidates",
    "clean_description",
    "describe",
    "generate",
    "in_categories",
    "main",
    "pluralize",
    "read_inventory",
    "render_scene",
    "sample_scene",
    "split_pools",
    "split_rng",
]
