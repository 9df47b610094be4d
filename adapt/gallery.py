"""One gallery interface: images searched by caption, in memory or on disk, with one result type.

A gallery is tied to the model whose encodings it holds (``gallery.model``) and answers
``search(captions, top_k, directions=...)`` with one list of :class:`SearchHit` per caption, best
first, scored with that model's exact ADAPT scores. Two implementations:

- :class:`MemoryGallery`: a few thousand images held as their raw region features, encoded lazily
  (the app's per-session uploads);
- :class:`adapt.search.GalleryIndex`: an on-disk, sharded gallery of millions of encoded images
  with a first stage (FAISS, or a Qdrant collection) and exact re-ranking.

Scores of galleries of one model are comparable, so :func:`search_galleries` merges several.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Protocol, Sequence, TypeVar

import numpy as np
import torch

from adapt.model import AdaptModel
from adapt.regions import Regions

T = TypeVar("T")


class GalleryModelError(ValueError):
    """A gallery searched with another model than the one whose encodings it holds."""


@dataclass
class SearchHit:
    """One gallery image found by a caption.

    Attributes:
        key: the image's key (an upload's content key, an index's image id).
        score: its exact ADAPT score for the caption.
        regions: its regions: boxes (in ``image_size`` pixels), detector labels and scores, fills.
            ``features`` is ``(k, 0)`` for a hit of an index, which keeps encoded regions only.
        region_weights: ``(k,)`` each region's share of the T2I score (see :func:`region_shares`),
            or ``None`` when the search did not use the T2I direction.
        source: a file showing the image (an index's thumbnail or the original path), if known.
        neutral_weights: ``(k,)`` each region's mean share for captions that name nothing
            (:func:`neutral_region_shares`), or ``None`` like ``region_weights``.
    """

    key: str
    score: float
    regions: Regions
    region_weights: np.ndarray | None
    source: str | None = None
    neutral_weights: np.ndarray | None = None


class Gallery(Protocol):
    """What every gallery offers (see the module docstring)."""

    model: AdaptModel

    def __len__(self) -> int: ...

    def search(
        self, captions: Sequence[str], top_k: int = 10, *, directions: tuple[str, ...] | None = None
    ) -> list[list[SearchHit]]: ...


# Captions that name nothing, chosen before measuring (issue 33 item 8, the pointing game).
NEUTRAL_CAPTIONS = ("a photo", "a picture", "an image", "a photo of something", "a picture of a scene")


def region_shares(terms: torch.Tensor) -> np.ndarray:
    """Each region's share of the evidence for a caption, from its terms of the T2I score.

    Args:
        terms: ``(..., k)`` regions' terms of the score (``Scores.region_attention``).

    Returns:
        ``(..., k)`` float32: the positive terms divided by their sum (uniform where none is
        positive); regions that speak against the caption get 0.
    """
    positive = terms.clamp(min=0).float().cpu()
    total = positive.sum(-1, keepdim=True)
    uniform = torch.full_like(positive, 1.0 / positive.shape[-1])
    return torch.where(total > 0, positive / total.clamp(min=1e-12), uniform).numpy()


def hit_region_shares(
    model: AdaptModel, encoded: torch.Tensor, words: torch.Tensor, mask: torch.Tensor,
    directions: tuple[str, ...] | None,
) -> np.ndarray | None:
    """Where one caption looked in each of a few hits: ``(n, k)`` region shares, or ``None``
    when the search's ``directions`` (default: the model's) leave out T2I.

    Args:
        encoded: ``(n, k, d)`` the hits' encoded regions (attention maps take the slower, exact
            path, so only hits are passed).
        words, mask: the caption, encoded (``(1, t, d)``, ``(1, t)``).
    """
    if "t2i" not in (directions or model.config.directions):
        return None
    out = model.similarity(encoded, words, mask, directions=("t2i",), return_attention=True)
    return region_shares(out.region_attention[:, 0])


def neutral_region_shares(
    model: AdaptModel, encoded: torch.Tensor, directions: tuple[str, ...] | None = None,
) -> np.ndarray | None:
    """Each region's mean share over :data:`NEUTRAL_CAPTIONS`: ``(n, k)`` for ``encoded (n, k, d)``
    regions of ``n`` images, or ``None`` when ``directions`` (default: the model's) leave out T2I.

    What any caption gives a region (the whole image and large boxes take much of every caption's
    score); a caption's share above it is what the caption itself adds there.
    """
    if "t2i" not in (directions or model.config.directions):
        return None
    words, mask = model.encode_text(list(NEUTRAL_CAPTIONS))
    out = model.similarity(encoded, words, mask, directions=("t2i",), return_attention=True)
    return region_shares(out.region_attention).mean(axis=1)


def merge_top_k(lists: Iterable[Iterable[tuple[float, T]]], k: int) -> list[tuple[float, T]]:
    """Global top ``k`` of several ``(score, item)`` lists (one per shard or gallery), best first.

    Only scores and items (ids, hits, or ``(shard, row)``) are needed, so the lists may come from
    shards served anywhere.
    """
    return heapq.nlargest(k, chain.from_iterable(lists), key=lambda hit: hit[0])


def best_per_caption(
    chunks: Iterable[tuple[Sequence[T], np.ndarray]], n_captions: int, top_k: int
) -> list[list[tuple[float, T]]]:
    """Each caption's ``top_k`` ``(score, item)``, best first, over a score matrix given in chunks
    of rows (the captions encoded once, the images scored a chunk at a time).

    Args:
        chunks: per chunk, the items of its ``m`` rows and their ``(m, n_captions)`` scores.
    """
    best: list[list[tuple[float, T]]] = [[] for _ in range(n_captions)]
    for items, scores in chunks:
        for q in range(n_captions):
            top = np.argsort(-scores[:, q], kind="stable")[:top_k]
            best[q] = merge_top_k([best[q], [(float(scores[i, q]), items[i]) for i in top]], top_k)
    return best


def search_galleries(
    galleries: Sequence[Gallery], captions: Sequence[str], top_k: int = 10,
    *, directions: tuple[str, ...] | None = None,
) -> list[list[SearchHit]]:
    """The ``top_k`` best hits per caption over several galleries of one model, best first.

    Raises:
        GalleryModelError: the galleries hold encodings of different models.
    """
    if any(g.model is not galleries[0].model for g in galleries[1:]):
        raise GalleryModelError("these galleries hold encodings of different models, whose scores "
                                "cannot be compared: search each with its own model")
    per_gallery = [g.search(captions, top_k, directions=directions) for g in galleries if len(g)]
    return [[hit for _, hit in merge_top_k([((h.score, h) for h in hits[q]) for hits in per_gallery], top_k)]
            for q in range(len(captions))]


class MemoryGallery:
    """A small gallery held in memory: images' regions, encoded once by ``model``, lazily.

    Args:
        model: the model that encodes and scores the gallery (put in eval mode).
    """

    def __init__(self, model: AdaptModel) -> None:
        self.model = model.eval()
        self._keys: list[str] = []
        self._regions: list[Regions] = []
        self._sources: list[str | None] = []
        self._encoded: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> list[str]:
        """The images' keys, in the order they were first added."""
        return list(self._keys)

    @property
    def regions(self) -> list[Regions]:
        """The images' regions, in key order."""
        return list(self._regions)

    @property
    def sources(self) -> list[str | None]:
        """The file showing each image (as given to :meth:`add`), in key order."""
        return list(self._sources)

    def add(self, key: str, regions: Regions, source: str | None = None) -> None:
        """Add one image (a key already present is replaced).

        Raises:
            ValueError: its region features do not have the model's ``region_dim``.
        """
        if regions.features.ndim != 2 or regions.features.shape[1] != self.model.config.region_dim:
            raise ValueError(f"region features of shape {regions.features.shape}; this gallery's model "
                             f"takes (n_regions, {self.model.config.region_dim})")
        if key in self._keys:
            i = self._keys.index(key)
            self._regions[i], self._sources[i] = regions, source
        else:
            self._keys.append(key)
            self._regions.append(regions)
            self._sources.append(source)
        self._encoded = None

    @torch.inference_mode()
    def search(
        self, captions: Sequence[str], top_k: int = 10, *, directions: tuple[str, ...] | None = None
    ) -> list[list[SearchHit]]:
        """The ``top_k`` images per caption, best first, with where each caption looked in each."""
        if isinstance(captions, str) or not captions:
            raise ValueError("captions must be a non-empty list of strings")
        if not self._keys:
            return [[] for _ in captions]
        if self._encoded is None:
            features = torch.from_numpy(np.stack([r.features for r in self._regions]))
            self._encoded = self.model.encode_regions(features.to(self.model.device))
        words, mask = self.model.encode_text(list(captions))
        scores = self.model.similarity(self._encoded, words, mask, directions=directions).scores  # (n, q)
        found = best_per_caption([(range(len(self)), scores.float().cpu().numpy())], len(captions), top_k)
        results = []
        for q, hits in enumerate(found):
            best = [i for _, i in hits]
            weights = hit_region_shares(self.model, self._encoded[best], words[q:q + 1], mask[q:q + 1], directions)
            neutral = neutral_region_shares(self.model, self._encoded[best], directions)
            results.append([
                SearchHit(self._keys[i], score, self._regions[i], None if weights is None else weights[rank],
                          self._sources[i], None if neutral is None else neutral[rank])
                for rank, (score, i) in enumerate(hits)
            ])
        return results
