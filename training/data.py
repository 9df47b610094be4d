"""Image-caption datasets of precomputed region features, and the order training batches come in.

A dataset is a folder in the SCAN / VSE++ "precomp" layout, optionally with the extras that
``training/extract.py`` writes for our own features:

=========================  ====================================================================
``{split}_ims.npy``        ``(n_images, n_regions, region_dim)`` float region features
``{split}_caps.txt``       ``captions_per_image`` (5) lines per image, in image order; the
                           reference code's name ``{split}_caps.en.txt`` is read too
``{split}_boxes.npy``      optional ``(n_images, n_regions, 4)`` region boxes
``{split}_ids.txt``        optional image ids, one a line (one a caption is accepted too),
                           URL-quoted as ``training/extract.py`` writes them: read back unquoted
``extractor.json``         optional identity of the region extractor (``AdaptConfig.extractor``)
=========================  ====================================================================

Splits are ``train``, ``dev``, ``test`` and, for COCO, ``testall`` (the 5000 test images).
Feature files are memory-mapped, so a COCO-size training set (113k x 36 x 2048 float32, 34 GB)
does not have to fit in RAM: a batch reads only its own rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import unquote

import numpy as np
import torch
from torch.utils.data import Dataset

from adapt import TokenBatch, tokenize
from adapt.regions import build_extractor

SPLITS = ("train", "dev", "test", "testall")
CAPTIONS_PER_IMAGE = 5
EXTRACTOR_FILE = "extractor.json"


class DatasetError(ValueError):
    """A dataset folder that does not match the documented layout; the message names the file."""


@dataclass
class Split:
    """One split of a dataset: region features and the captions of every image.

    Caption ``c`` describes image ``c // captions_per_image``.

    Attributes:
        root: the dataset folder.
        name: ``"train"``, ``"dev"``, ...
        features: ``(n_images, n_regions, region_dim)``, memory-mapped (read-only).
        captions: ``n_images * captions_per_image`` strings.
        captions_per_image: 5 for Flickr30k and COCO.
        extractor: the region extractor's identity from ``extractor.json``, if present.
    """

    root: Path
    name: str
    features: np.ndarray
    captions: list[str]
    captions_per_image: int = CAPTIONS_PER_IMAGE
    extractor: dict[str, Any] | None = None

    @property
    def n_images(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_regions(self) -> int:
        return int(self.features.shape[1])

    @property
    def region_dim(self) -> int:
        return int(self.features.shape[2])

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def images(self, start: int, stop: int) -> "Split":
        """Images ``[start, stop)`` and their captions, as a split of their own (no copy)."""
        if not 0 <= start < stop <= self.n_images:
            raise ValueError(f"image range [{start}, {stop}) is outside the {self.n_images} images of {self}")
        k = self.captions_per_image
        return replace(
            self,
            features=self.features[start:stop],
            captions=self.captions[start * k : stop * k],
        )

    def region_features(self, indices: Sequence[int] | np.ndarray | slice) -> torch.Tensor:
        """Features of the given images as a float32 tensor ``(len(indices), n_regions, region_dim)``.

        Only these rows are read from disk.
        """
        rows = self.features[indices] if isinstance(indices, slice) else self.features[np.asarray(indices)]
        return torch.from_numpy(np.array(rows, dtype=np.float32))  # a copy: memmaps are read-only

    def __str__(self) -> str:
        return f"{self.root}/{self.name}"


def caption_file(root: Path, split: str) -> Path:
    """``{split}_caps.txt``, or the reference's ``{split}_caps.en.txt``; DatasetError if neither."""
    for name in (f"{split}_caps.txt", f"{split}_caps.en.txt"):
        if (root / name).is_file():
            return root / name
    raise DatasetError(
        f"{root}: no captions for split {split!r}: expected {split}_caps.txt or {split}_caps.en.txt"
        f"{_listing(root)}"
    )


def read_extractor(root: str | Path) -> dict[str, Any] | None:
    """The extractor identity in ``root/extractor.json``, or ``None`` when the file is absent."""
    path = Path(root) / EXTRACTOR_FILE
    if not path.is_file():
        return None
    try:
        identity = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(identity, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(identity).__name__}")
    return identity


def resolve_extractor(split: Split, name: str | None) -> dict[str, Any] | None:
    """The identity of the region extractor that made ``split``'s features (``AdaptConfig.extractor``).

    The folder's ``extractor.json`` says it; a folder without one (SCAN / VSE precomp files) says
    nothing, and then ``name`` (``data.extractor``, e.g. ``"bottom-up-attention"``) does: that backend
    is built (its weights fetched once) and its identity must fit the features' shape. ``None`` when
    neither says: the checkpoint records an unknown origin, which serving new images refuses.

    Raises:
        DatasetError: ``name`` contradicts ``extractor.json``, or its features have another shape.
    """
    if split.extractor is not None:
        if name is not None and split.extractor.get("name") != name:
            raise DatasetError(f"{split.root / EXTRACTOR_FILE} names the extractor {split.extractor.get('name')!r}, "
                               f"not data.extractor={name!r}; drop data.extractor, the folder says it")
        return split.extractor
    if name is None:
        return None
    identity = build_extractor(name, device="cpu").identity
    made = (identity["num_regions"], identity["feature_dim"])
    if made != (split.n_regions, split.region_dim):
        raise DatasetError(f"{split}: features are {split.n_regions} x {split.region_dim} per image, but {name} makes "
                           f"{made[0]} x {made[1]}: they come from another extractor or other settings, so "
                           "data.extractor cannot name it; leave it unset (the origin stays unknown)")
    return identity


@dataclass
class ImageRows:
    """The image side of a split, one row per image: what a gallery index needs of it.

    Attributes:
        features: ``(n_images, n_regions, region_dim)``, memory-mapped (read-only).
        boxes: ``(n_images, n_regions, 4)`` memory-mapped boxes, when the files have them.
        ids: one id per image (for our own features its path relative to the images folder),
            when the files have them.
    """

    features: np.ndarray
    boxes: np.ndarray | None = None
    ids: list[str] | None = None


def load_image_rows(root: str | Path, split: str, captions_per_image: int = CAPTIONS_PER_IMAGE) -> ImageRows:
    """Read the features, boxes and image ids of one split (arrays memory-mapped), checking their shapes.

    Ids are URL-unquoted: ``training/extract.py`` quotes each image's path so that it holds no
    whitespace, and an id is used to find the image's file again.

    Raises:
        DatasetError: the folder or its features are missing, or a file is unreadable or has the
            wrong shape.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    features_path = root / f"{split}_ims.npy"
    if not features_path.is_file():
        raise DatasetError(f"{root}: no region features for split {split!r}: expected "
                           f"{features_path.name}{_listing(root)}")
    features = _load_array(features_path)
    if features.ndim != 3 or not np.issubdtype(features.dtype, np.floating):
        raise DatasetError(f"{features_path}: expected float features of shape (n_images, n_regions, "
                           f"region_dim), got {features.dtype} {features.shape}")
    n_images = features.shape[0]

    boxes = None
    boxes_path = root / f"{split}_boxes.npy"
    if boxes_path.is_file():
        boxes = _load_array(boxes_path)
        if boxes.shape != (n_images, features.shape[1], 4):
            raise DatasetError(f"{boxes_path}: expected shape {(n_images, features.shape[1], 4)} to match "
                               f"{features_path.name}, got {boxes.shape}")

    image_ids = None
    ids_path = root / f"{split}_ids.txt"
    if ids_path.is_file():
        ids = [unquote(line.strip()) for line in ids_path.read_text(encoding="utf-8").split("\n") if line.strip()]
        if len(ids) == n_images:
            image_ids = ids
        elif len(ids) == n_images * captions_per_image:
            image_ids = ids[::captions_per_image]  # VSE-style files list an id per caption
        else:
            raise DatasetError(f"{ids_path}: {len(ids)} ids; expected one per image ({n_images}) or one "
                               f"per caption ({n_images * captions_per_image})")
    return ImageRows(features, boxes, image_ids)


def load_split(root: str | Path, split: str, captions_per_image: int = CAPTIONS_PER_IMAGE) -> Split:
    """Read one split of a dataset folder (features memory-mapped), checking every file's shape
    (the image files' with :func:`load_image_rows`).

    Raises:
        DatasetError: a file is missing or unreadable, shapes disagree, or a caption is empty.
    """
    root = Path(root)
    features = load_image_rows(root, split, captions_per_image).features
    n_images = features.shape[0]

    captions_path = caption_file(root, split)
    # Split on "\n" only, as the reference's readlines(): str.splitlines() (and text mode's
    # newline translation of a lone "\r") would also break a caption at characters such as U+2028
    # and shift every later caption to the wrong image.
    captions = captions_path.read_bytes().decode("utf-8").split("\n")
    if captions[-1] == "":
        captions.pop()
    if len(captions) != n_images * captions_per_image:
        raise DatasetError(
            f"{captions_path}: {len(captions)} captions for the {n_images} images of {split}_ims.npy; "
            f"expected {captions_per_image} per image = {n_images * captions_per_image}"
        )
    empty = [i + 1 for i, c in enumerate(captions) if not tokenize(c)]
    if empty:
        raise DatasetError(f"{captions_path}: lines {empty[:10]}{' ...' if len(empty) > 10 else ''} have no words")
    return Split(root, split, features, [c.strip() for c in captions], captions_per_image, read_extractor(root))


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DatasetError(f"{path}: not a readable .npy array ({e})") from e


def _listing(root: Path) -> str:
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return f" (the folder holds: {', '.join(names[:20]) or 'nothing'})"


class CaptionPairs(Dataset):
    """Every ``(image index, caption)`` pair of a split; item ``c`` is caption ``c``.

    As in SCAN / VSE++ and the reference (``PrecompDataset``), all 5 captions of an image are
    training pairs; :class:`DistinctImageBatches` keeps two captions of one image out of a batch.
    """

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, index: int) -> tuple[int, str]:
        return index // self.split.captions_per_image, self.split.captions[index]


@dataclass
class PairBatch:
    """A training batch: pair ``i`` is image ``image_index[i]`` with caption ``i``.

    Attributes:
        features: ``(b, n_regions, region_dim)`` float32.
        tokens: the captions tokenised by the model, ``(b, n_tokens)``.
        image_index: ``(b,)`` long, indices into the split.
    """

    features: torch.Tensor
    tokens: TokenBatch
    image_index: torch.Tensor

    def pin_memory(self) -> "PairBatch":
        """The batch in pinned memory (the DataLoader calls this with ``pin_memory=True``)."""
        return PairBatch(self.features.pin_memory(),
                         TokenBatch(self.tokens.ids.pin_memory(), self.tokens.mask.pin_memory()),
                         self.image_index.pin_memory())


class PairCollate:
    """Collate :class:`CaptionPairs` items into a :class:`PairBatch`.

    Args:
        split: where the features are read from.
        tokenize: the model's tokenizer (``AdaptModel.tokenize``).
    """

    def __init__(self, split: Split, tokenize: Callable[[list[str]], TokenBatch]) -> None:
        self.split = split
        self.tokenize = tokenize

    def __call__(self, items: list[tuple[int, str]]) -> PairBatch:
        images = [image for image, _ in items]
        return PairBatch(self.split.region_features(images), self.tokenize([c for _, c in items]),
                         torch.tensor(images, dtype=torch.long))


class DistinctImageBatches:
    """The caption indices of each training batch, with no image twice in a batch.

    Two captions of one image in a batch would make a positive pair count as a negative of the
    other. SCAN / VSE++ and the reference shuffle all captions freely and accept that (at batch
    128 on Flickr30k about one batch in five has such a pair); here each epoch is made of
    ``captions_per_image`` rounds, each round a fresh permutation of the images with one caption
    per image (every caption is used once per epoch), cut into batches; the batches of all rounds
    are then shuffled together. The last, shorter batch of a round is kept when it has at least 2
    pairs (a hinge loss needs a negative).

    The order depends only on ``(seed, epoch)``, so a resumed run sees the same batches.

    Under DDP (``world_size`` processes) ``batch_size`` is the global batch: process ``rank`` gets
    one contiguous shard of each global batch, and the shards of ranks 0, 1, ... put together are
    the batch one process would get. A round's last batch is then kept when every rank gets a pair.
    """

    def __init__(self, n_images: int, captions_per_image: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if n_images < 2:
            raise ValueError(f"need at least 2 training images, got {n_images}")
        if batch_size < max(2, world_size):
            raise ValueError(f"batch size must be at least 2 (a hinge loss needs negatives) and at least "
                             f"the number of processes ({world_size}), got {batch_size}")
        self.n_images = n_images
        self.captions_per_image = captions_per_image
        self.batch_size = min(batch_size, n_images)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.smallest = max(2, world_size)

    def __len__(self) -> int:
        full, rest = divmod(self.n_images, self.batch_size)
        return self.captions_per_image * (full + (rest >= self.smallest))

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The batches of ``epoch``, each an array of caption indices (this rank's shards)."""
        rng = np.random.default_rng([self.seed, epoch])
        k = self.captions_per_image
        # Row i: the order in which image i's captions are used across the rounds.
        caption_order = rng.permuted(np.tile(np.arange(k), (self.n_images, 1)), axis=1)
        batches = []
        for round_ in range(k):
            images = rng.permutation(self.n_images)
            captions = images * k + caption_order[images, round_]
            batches += [b for b in np.split(captions, range(self.batch_size, self.n_images, self.batch_size))
                        if len(b) >= self.smallest]
        return [np.array_split(batches[i], self.world_size)[self.rank] for i in rng.permutation(len(batches))]
