"""From raw images and text to rankings: image -> regions -> features -> ADAPT scores.

``Retriever`` pairs a model with the region extractor it was trained with (refusing any other),
ranks captions for an image, searches a gallery (:mod:`adapt.gallery`) with a caption, and keeps
each region's share of the score so callers can show where the caption looked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from adapt.cache import RegionCache
from adapt.device import pick_device
from adapt.gallery import (
    Gallery, GalleryModelError, SearchHit, neutral_region_shares, region_shares, search_galleries,
)
from adapt.model import AdaptModel
from adapt.regions import (
    ImageError,
    ImageSource,
    RegionExtractor,
    Regions,
    build_extractor,
    check_extractor,
    load_image,
)
from adapt.regions.base import WORKING_MAX_SIDE

# Padded caption tokens scored at once by rank_captions: the text encoder's activations and the
# (n, t, d) word features of one call grow with this, not with the number of captions.
CHUNK_TOKENS = 4096


@dataclass
class RankedCaptions:
    """Captions of one image, best first.

    Attributes:
        captions: the captions, ranked.
        scores: ``(n,)`` their scores, descending.
        region_weights: ``(n, k)`` where each ranked caption looked: each region's share of the
            caption's T2I score (see :func:`region_shares`; rows sum to 1), or ``None`` for a model
            without the T2I direction.
        regions: the image's regions (boxes, labels, ...).
        neutral_weights: ``(k,)`` each region's mean share for captions that name nothing
            (:func:`~adapt.gallery.neutral_region_shares`), or ``None`` like ``region_weights``.
    """

    captions: list[str]
    scores: np.ndarray
    region_weights: np.ndarray | None
    regions: Regions
    neutral_weights: np.ndarray | None = None


@dataclass
class ImageFile:
    """An image file as :meth:`Retriever.extract_files` read it.

    Attributes:
        path: the file.
        name: what to call it in messages and listings.
        image: the decoded RGB picture, or ``None`` when it could not be read.
        key: its content key (see :meth:`RegionCache.key`), ``None`` when unread.
        regions: its regions, ``None`` when unread.
        problem: why it could not be read (a message naming ``name``), else ``None``.
    """

    path: str | Path
    name: str
    image: Image.Image | None = None
    key: str | None = None
    regions: Regions | None = None
    problem: ImageError | None = None


class Retriever:
    """An ADAPT model with the region extractor it was trained with.

    Args:
        model: the model (``config.extractor`` names its extractor).
        extractor: the extractor; default: rebuilt from ``model.config.extractor``.
        allow_extractor_mismatch: use an extractor other than the model's at your own risk.
        cache_dir: where region features of images are cached (default: no disk cache).
        cache_max_bytes: bound of that cache (see :class:`RegionCache`; default: unbounded).
    """

    def __init__(
        self,
        model: AdaptModel,
        extractor: RegionExtractor | None = None,
        allow_extractor_mismatch: bool = False,
        cache_dir: str | Path | None = None,
        cache_max_bytes: int | None = None,
    ) -> None:
        self.model = model.eval()
        if extractor is None:
            if model.config.extractor is None:
                raise ValueError(
                    "the model does not name the region extractor of its training features; "
                    "pass extractor=adapt.regions.build_extractor(...) and allow_extractor_mismatch=True"
                )
            # build_extractor checks the rebuilt extractor against the identity itself.
            extractor = build_extractor(model.config.extractor, allow_mismatch=allow_extractor_mismatch,
                                        device=model.device)
        else:
            check_extractor(model.config.extractor, extractor.identity, allow_mismatch=allow_extractor_mismatch)
        self.extractor = extractor
        self.cache = None if cache_dir is None else RegionCache(cache_dir, extractor.identity, cache_max_bytes)

    @classmethod
    def from_pretrained(
        cls, checkpoint: str | Path, device: torch.device | str | None = None,
        **kwargs,
    ) -> "Retriever":
        """Load a checkpoint (local folder or Hub id) and its extractor."""
        model = AdaptModel.from_pretrained(str(checkpoint), map_location=str(device or pick_device()))
        return cls(model, **kwargs)

    @property
    def directions(self) -> tuple[str, ...]:
        """The heads this model can score with: its own kind, then the baseline without ADAPT."""
        own = self.model.config.directions
        return own if "mean" in own else (*own, "mean")

    def regions(self, image: ImageSource | Image.Image) -> tuple[str, Regions]:
        """Content key and regions of an image, from the cache when possible.

        Raises:
            adapt.regions.ImageError: the input is not a usable image.
        """
        return self._regions_of([load_image(image, self.extractor.max_pixels)])[0]

    def extract_files(
        self, paths: Sequence[str | Path], names: Sequence[str] | None = None, max_pixels: int | None = None,
        max_side: int | None = None, batch_size: int = 8,
    ) -> Iterator[ImageFile]:
        """Load and extract image files, ``batch_size`` at a time, yielding each in order (lazily:
        a caller that stops early costs no further extraction); a file that cannot be read comes
        with its ``problem`` instead of regions.

        Args:
            paths: the files.
            names: what to call each in messages (default: its file name).
            max_pixels: refuse larger images (default and upper bound: the extractor's).
            max_side: decode large JPEGs at a reduced scale keeping this side (see
                :func:`~adapt.regions.load_image`).
        """
        names = [Path(p).name for p in paths] if names is None else list(names)
        max_pixels = min(max_pixels or self.extractor.max_pixels, self.extractor.max_pixels)
        for start in range(0, len(paths), batch_size):
            files = [ImageFile(path, name) for path, name in zip(paths[start:start + batch_size],
                                                                names[start:start + batch_size])]
            for file in files:
                try:
                    file.image = load_image(file.path, max_pixels, max_side=max_side, name=file.name)
                except ImageError as e:
                    file.problem = e
            read = [file for file in files if file.problem is None]
            for file, (key, regions) in zip(read, self._regions_of([file.image for file in read])):
                file.key, file.regions = key, regions
            yield from files

    def _regions_of(self, images: list[Image.Image]) -> list[tuple[str, Regions]]:
        """Content keys and regions of loaded images, the uncached ones extracted in one batch."""
        keys = [RegionCache.key(image) for image in images]
        found = [self.cache.get(key) if self.cache is not None else None for key in keys]
        missing = [i for i, regions in enumerate(found) if regions is None]
        extracted = self.extractor.extract_batch([images[i] for i in missing], batch_size=len(missing)) if missing else []
        for i, regions in zip(missing, extracted):
            found[i] = regions
            if self.cache is not None:
                self.cache.put(keys[i], regions)
        return list(zip(keys, found))

    @torch.inference_mode()
    def rank_captions(
        self, image: ImageSource | Regions, captions: list[str], directions: tuple[str, ...] | None = None
    ) -> RankedCaptions:
        """Rank ``captions`` for one image, best first, with where each caption looked (its regions' shares).

        Args:
            image: an image (path, PIL, array) or its precomputed :class:`Regions`.
            captions: candidate captions (each with at least one word).
            directions: ``("t2i",)``, ``("i2t",)`` or both (default: the model's kind).
        """
        regions = image if isinstance(image, Regions) else self.regions(image)[1]
        features = torch.from_numpy(regions.features[None])
        scores = np.empty(len(captions), dtype=np.float32)
        attention: list[torch.Tensor | None] = [None] * len(captions)
        for chunk in caption_chunks(self.model.tokenize(list(captions)).mask.sum(1).tolist()):
            out = self.model.score(features, [captions[i] for i in chunk], directions=directions,
                                   return_attention=True)
            scores[chunk] = out.scores[0].cpu().numpy()
            if out.region_attention is not None:
                for row, i in enumerate(chunk):
                    attention[i] = out.region_attention[0, row]
        order = np.argsort(-scores, kind="stable")
        ranked = [captions[i] for i in order]
        if attention[0] is None:
            return RankedCaptions(ranked, scores[order], None, regions)
        neutral = neutral_region_shares(self.model, self.model.encode_regions(features), ("t2i",))[0]
        return RankedCaptions(ranked, scores[order], region_shares(torch.stack(attention))[order], regions, neutral)

    def search(
        self, galleries: Sequence[Gallery], caption: str, top_k: int = 10,
        directions: tuple[str, ...] | None = None,
    ) -> list[SearchHit]:
        """The ``top_k`` images for a caption over the non-empty ``galleries`` together, best first,
        with where the caption looked in each (see :func:`~adapt.gallery.search_galleries`).

        Raises:
            GalleryModelError: a gallery holds the encodings of another model.
        """
        if any(gallery.model is not self.model for gallery in galleries):
            raise GalleryModelError("this gallery holds the encodings of another model than this "
                                    "retriever's: build it with MemoryGallery(retriever.model), or open "
                                    "the index with this retriever's model")
        return search_galleries(galleries, [caption], top_k, directions=directions)[0]


def caption_chunks(lengths: Sequence[int], padded_tokens: int = CHUNK_TOKENS) -> list[list[int]]:
    """Caption positions grouped for scoring, shortest first, each group's padded batch
    (``len(group) * its longest caption``) at most ``padded_tokens`` (a longer caption alone).

    Captions are scored independently of each other, so chunks give the same scores as one batch;
    they bound the memory of one call (the text encoder's activations and the ``(n, t, d)`` word
    features grow with the padded batch, and one long caption would pad every short one).
    """
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):  # so the newest is the longest
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= padded_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def hit_image(hit: SearchHit, max_pixels: int, name: str | None = None) -> Image.Image | None:
    """The picture of a search hit (decoded near the extractor's working size), or ``None`` when
    its file is gone or no longer readable (an upload past its lifetime, a moved original)."""
    if hit.source is None:
        return None
    try:
        return load_image(hit.source, max_pixels, max_side=WORKING_MAX_SIDE, name=name or hit.key)
    except ImageError:
        return None


def read_model_card(checkpoint: str | Path) -> str | None:
    """The text of a local checkpoint's model card (``README.md``) without its YAML header (the
    Hub's metadata), or ``None`` when it has none."""
    card = Path(checkpoint) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    return text.split("---", 2)[-1] if text.startswith("---") else text
