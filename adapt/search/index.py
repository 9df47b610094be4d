"""The gallery index: the coordinator that asks every shard for first-stage candidates, has them
re-ranked exactly and merges the results.

Exact re-ranking: the K first-stage candidates' stored regions are scored against the caption
with the model's own :class:`~adapt.similarity.AdaptiveSimilarity` (its directions: T2I, I2T or
the ensemble), and the ``top_k`` best are returned. In eval mode BatchNorm uses running
statistics, so a pair's score does not depend on which other images are scored with it:
re-ranking gives exactly the scores of exhaustive search, and with K = gallery size the same
ranking.

Results are those of every gallery (:mod:`adapt.gallery`): per caption, its ``top_k``
:class:`~adapt.gallery.SearchHit`, each with its boxes, the labels and thumbnail stored with it
(:class:`~adapt.search.shard.ImageDetails`) and each region's share of the score (one attention
pass over the ``top_k`` hits alone).

Sharding and the merge at query time: each shard is self-contained (its arrays and its own FAISS
index, :mod:`adapt.search.shard`), so shards can be served by different processes or machines,
and a gallery larger than one machine's RAM is spread over them. For each caption:

1. every shard returns its K best first-stage candidates as ``(first-stage score, row)``;
2. the coordinator keeps the K best of all of them (first-stage scores are comparable across
   shards: same model, same vectors), so re-ranking costs K pairs whatever the shard count;
3. every shard re-ranks its own share of those K with exact ADAPT scores and returns its
   ``top_k`` as ``(score, id)``;
4. the coordinator merges those lists with a heap (:func:`merge_top_k`) into the final ``top_k``.

Only the query and ``(score, id)`` lists cross shard boundaries, never image features: in
:class:`GalleryIndex` the shards are local folders called in turn, and a remote shard (holding a
copy of the model) needs to expose just :meth:`Shard.candidates` and :meth:`Shard.exact_scores`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from adapt.gallery import SearchHit, best_per_caption, hit_region_shares, merge_top_k, neutral_region_shares
from adapt.io import atomic_write_json
from adapt.model import AdaptModel
from adapt.regions import ExtractorMismatchError, check_extractor
from adapt.search.fingerprint import fingerprint_differences, model_fingerprint
from adapt.search.candidates import VECTOR_KINDS, VectorKind, caption_queries, image_vectors, vector_size
from adapt.search.qdrant import QdrantFirstStage
from adapt.search.shard import GalleryIndexError, ImageDetails, Shard, boxes_only

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "adapt-gallery-index"
# 2: the model's config hash leaves out its extractor, compared by check_extractor;
# 3: the config recorded field by field, image details, the first stage's backend
FORMAT_VERSION = 3
VECTOR_KIND_KEY = "first_stage"  # the manifest's name for the vector kind, kept: every index so far has it
DEFAULT_SHARD_SIZE = 250_000
DEFAULT_CANDIDATES = 200  # twice the K that recalled the whole top-10 of 10k to 1M synthetic images
ENCODE_BATCH = 512  # images per encode_regions call in add()
SCORE_BATCH_BYTES = 256 * 2**20  # float32 regions per exact-scoring chunk in search_exhaustive()
PROGRESS_MIN_ROWS = 10_000
OTHER_MODEL = ("Its stored region features only mean something to that model: open it with the model it was "
               "built with, or build a new index for this one with GalleryIndex.create")

def top_candidates(
    scores: Sequence[np.ndarray], rows: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best first-stage hits over all shards, per query.

    Args:
        scores: per shard, ``(n_queries, k_s)`` first-stage scores.
        rows: per shard, ``(n_queries, k_s)`` rows; ``-1`` marks no hit (FAISS pads with it).
        k: how many to keep.

    Returns:
        ``shard (n_queries, k')`` and ``row (n_queries, k')``, best first, ``k' = min(k, hits)``;
        ``-1`` rows where a query has fewer hits than ``k'``.
    """
    all_scores = np.concatenate([np.where(r >= 0, s, -np.inf) for s, r in zip(scores, rows)], axis=1)
    all_rows = np.concatenate(rows, axis=1)
    shard_of = np.concatenate([np.full(r.shape[1], i) for i, r in enumerate(rows)])
    k = min(k, all_scores.shape[1])
    best = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return shard_of[best], np.take_along_axis(all_rows, best, axis=1)


def _float_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 tensor of an array, a read-only memmap slice, or a tensor (which stays put)."""
    if isinstance(values, torch.Tensor):
        return values.float()
    return torch.from_numpy(np.array(values, dtype=np.float32))


class GalleryIndex:
    """A sharded, memory-mapped gallery of encoded images with two-stage ADAPT search.

    Build with :meth:`create` + :meth:`add`, load with :meth:`open`, query with :meth:`search`
    (see the module docstring for the design); one of the galleries of :mod:`adapt.gallery`. The
    model is put in eval mode: BatchNorm must use its running statistics for scores to be per pair.

    Example::

        index = GalleryIndex.create("gallery", model)
        index.add(region_features, boxes, ids)            # (n, r, region_dim), (n, r, 4), n ids
        index = GalleryIndex.open("gallery", model)       # later, memory-mapped
        hits = index.search(["a dog on a bench"], top_k=10)[0]
        [(hit.key, hit.score) for hit in hits]
    """

    def __init__(self, folder: Path, model: AdaptModel, manifest: dict[str, Any],
                 qdrant: QdrantFirstStage | None = None) -> None:
        self.folder = folder
        self.model = model.eval()
        self._manifest = manifest
        self.qdrant = qdrant
        self.shards = [Shard(folder / s["name"], s["count"], manifest["shard_size"], with_ann=qdrant is None)
                       for s in manifest["shards"]]
        self._keys = {key for shard in self.shards for key in shard.ids}

    @property
    def shard_size(self) -> int:
        return int(self._manifest["shard_size"])

    @property
    def vector_kind(self) -> VectorKind:
        """The kind of first-stage vectors, ``"fovea-max"`` or ``"mean"`` (:mod:`adapt.search.candidates`)."""
        return self._manifest[VECTOR_KIND_KEY]

    @property
    def n_regions(self) -> int | None:
        """Regions per image, fixed by the first :meth:`add` (None while empty)."""
        return self._manifest["n_regions"]

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def __contains__(self, key: object) -> bool:
        """Whether an image of this id is in the index."""
        return key in self._keys

    @classmethod
    def create(
        cls,
        folder: str | Path,
        model: AdaptModel,
        shard_size: int = DEFAULT_SHARD_SIZE,
        vector_kind: VectorKind | None = None,
        qdrant: QdrantFirstStage | None = None,
    ) -> "GalleryIndex":
        """Start an empty index in ``folder`` (which must not hold one) for ``model``'s features.

        Args:
            shard_size: images per shard: the unit that is preallocated, memory-mapped and can be
                served from its own machine.
            vector_kind: the first stage's vectors, ``"fovea-max"`` (default when the model has
                T2I) or ``"mean"`` (default for I2T-only models); see :mod:`adapt.search.candidates`.
            qdrant: keep the first-stage vectors in this (new) Qdrant collection instead of a FAISS
                index per shard (:mod:`adapt.search.qdrant`).
        """
        folder = Path(folder)
        if shard_size < 1:
            raise GalleryIndexError(f"shard_size must be positive, got {shard_size}")
        has_t2i = "t2i" in model.config.directions
        vector_kind = vector_kind or ("fovea-max" if has_t2i else "mean")
        if vector_kind not in VECTOR_KINDS:
            raise GalleryIndexError(f"vector_kind={vector_kind!r} is not one of {VECTOR_KINDS}")
        if vector_kind == "fovea-max" and not has_t2i:
            raise GalleryIndexError("vector_kind='fovea-max' is derived from the T2I head and this "
                                    f"model is {model.config.similarity!r}: use vector_kind='mean'")
        if (folder / MANIFEST_NAME).exists():
            raise GalleryIndexError(f"{folder} already holds a gallery index: open it with "
                                    "GalleryIndex.open, or pick an empty folder")
        if qdrant is not None:
            qdrant.create(vector_size(model, vector_kind))
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": model_fingerprint(model),
                    VECTOR_KIND_KEY: vector_kind, "backend": {"kind": "faiss"} if qdrant is None else qdrant.describe(),
                    "shard_size": shard_size, "n_regions": None, "shards": [], "count": 0}
        atomic_write_json(folder / MANIFEST_NAME, manifest)
        return cls(folder, model, manifest, qdrant)

    @classmethod
    def open(cls, folder: str | Path, model: AdaptModel, qdrant: QdrantFirstStage | None = None) -> "GalleryIndex":
        """Open an index built for ``model``; its arrays are memory-mapped, not read into RAM.

        Args:
            qdrant: the client of an index whose first stage is a Qdrant collection (default:
                connect to where the manifest says).

        Raises:
            GalleryIndexError: no index there, or it was built with a different model.
        """
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST_NAME).read_text())
        except (OSError, ValueError) as e:
            raise GalleryIndexError(f"{folder}: no readable {MANIFEST_NAME} ({e}); build an index "
                                    "with GalleryIndex.create") from e
        if manifest.get("format") != FORMAT_NAME:
            raise GalleryIndexError(f"{folder}: {MANIFEST_NAME} is not an adapt gallery index's")
        if manifest.get("version") != FORMAT_VERSION:
            raise GalleryIndexError(f"{folder}: an index of format version {manifest.get('version')}; this "
                                    f"adapt reads version {FORMAT_VERSION}: rebuild it with GalleryIndex.create")
        differ = fingerprint_differences(manifest["model"], model)
        if differ:
            raise GalleryIndexError(f"{folder} was built with a different model ({'; '.join(differ)}). {OTHER_MODEL}")
        stored = manifest["model"]["extractor"]
        if stored is not None or model.config.extractor is not None:
            try:
                check_extractor(stored, model.config.extractor, names=("index", "model"), advice=OTHER_MODEL)
            except ExtractorMismatchError as e:
                raise GalleryIndexError(f"{folder} was built with a different model: {e}") from e
        backend = manifest["backend"]
        if backend["kind"] == "qdrant":
            if qdrant is None:
                if backend["location"] is None:
                    raise GalleryIndexError(f"{folder}: its Qdrant collection was in a client's memory; pass "
                                            "that client as GalleryIndex.open(..., qdrant=QdrantFirstStage(...))")
                qdrant = QdrantFirstStage.connect(backend["location"], backend["collection"], folder)
            qdrant.check(vector_size(model, manifest[VECTOR_KIND_KEY]))
        elif qdrant is not None:
            raise GalleryIndexError(f"{folder}: its first stage is FAISS, not a Qdrant collection")
        return cls(folder, model, manifest, qdrant)

    def close(self) -> None:
        """Release the Qdrant client, if any (an embedded collection allows one process at a time)."""
        if self.qdrant is not None:
            self.qdrant.close()

    # -- building ----------------------------------------------------------------------------

    def add(
        self,
        region_features: np.ndarray | torch.Tensor,
        boxes: np.ndarray | torch.Tensor | None,
        ids: Sequence[str],
        details: Sequence[ImageDetails | None] | None = None,
    ) -> None:
        """Encode and append images; existing shards are not rewritten.

        Args:
            region_features: ``(n, n_regions, region_dim)`` region features (a memmap works: it is
                read ``ENCODE_BATCH`` images at a time).
            boxes: ``(n, n_regions, 4)`` region boxes, or None (stored as NaN).
            ids: ``n`` image ids, kept in order, none already in the index.
            details: per image, what a hit shows (labels, image size, a file to show), or None.
        """
        n = len(region_features)
        self._check_add(region_features, boxes, ids, details)
        details = [None] * n if details is None else list(details)
        if self.n_regions is None:
            self._manifest["n_regions"] = int(region_features.shape[1])
        touched: set[int] = set()
        with torch.inference_mode(), tqdm(total=n, unit="img", desc="encoding",
                                          disable=n < PROGRESS_MIN_ROWS) as progress:
            start = 0
            while start < n:
                shard = self._open_shard()
                stop = min(n, start + ENCODE_BATCH, start + shard.capacity - shard.count)
                encoded = self.model.encode_regions(_float_tensor(region_features[start:stop]))
                vectors = image_vectors(self.model, self.vector_kind, encoded).float().cpu().numpy()
                batch_boxes = (np.full((stop - start, self.n_regions, 4), np.nan, np.float32)
                               if boxes is None else np.asarray(boxes[start:stop], dtype=np.float32))
                if self.qdrant is not None:
                    self.qdrant.add((len(self.shards) - 1) * self.shard_size + shard.count, vectors)
                shard.append(encoded.float().cpu().numpy(), vectors, batch_boxes,
                             [str(i) for i in ids[start:stop]], details[start:stop])
                touched.add(len(self.shards) - 1)
                progress.update(stop - start)
                start = stop
        for i in sorted(touched):
            self.shards[i].save()
        self._manifest["shards"] = [{"name": s.folder.name, "count": s.count} for s in self.shards]
        self._manifest["count"] = len(self)
        atomic_write_json(self.folder / MANIFEST_NAME, self._manifest)
        self._keys.update(map(str, ids))

    def trim(self) -> None:
        """Cut every shard's preallocated arrays to the images they hold, before copying the index
        (to a Space, say): a copy carries a sparse file's holes in full. A later add extends them."""
        for shard in self.shards:
            shard.trim()

    def _check_add(self, features: Any, boxes: Any, ids: Sequence[str], details: Sequence | None) -> None:
        n = len(features)
        shape = tuple(features.shape)
        if len(shape) != 3 or shape[2] != self.model.config.region_dim:
            raise ValueError(f"region_features must have shape (n, n_regions, "
                             f"{self.model.config.region_dim}), got {shape}")
        if self.n_regions is not None and shape[1] != self.n_regions:
            raise ValueError(f"this index holds {self.n_regions} regions per image, got {shape[1]}: "
                             "extract the same number of regions for every image")
        if boxes is not None and tuple(boxes.shape) != (n, shape[1], 4):
            raise ValueError(f"boxes must have shape {(n, shape[1], 4)}, got {tuple(boxes.shape)}")
        if len(ids) != n or (details is not None and len(details) != n):
            raise ValueError(f"got {n} images but {len(ids)} ids" + ("" if details is None else
                                                                      f" and {len(details)} details"))
        repeated = [str(i) for i in ids if str(i) in self._keys]
        if repeated or len(set(map(str, ids))) != n:
            raise ValueError(f"image ids must be new and distinct; repeated: {repeated[:5] or 'within the batch'}")

    def _open_shard(self) -> Shard:
        """The shard that takes the next rows: the last one, or a new one when it is full."""
        if not self.shards or self.shards[-1].count == self.shard_size:
            folder = self.folder / f"shard-{len(self.shards):05d}"
            self.shards.append(Shard.allocate(
                folder, self.shard_size, self.n_regions, self.model.config.latent_size,
                None if self.qdrant is not None else vector_size(self.model, self.vector_kind)))
        return self.shards[-1]

    # -- searching ---------------------------------------------------------------------------

    def _encode_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str) or not captions:
            raise ValueError("captions must be a non-empty list of strings")
        if not len(self):
            raise GalleryIndexError(f"{self.folder} holds no images yet: add some with .add()")
        return self.model.encode_text(list(captions))

    def _candidates(self, queries: np.ndarray, candidates: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard and row of each caption's ``candidates`` best images by first-stage score."""
        if self.qdrant is None:
            hits = [s.candidates(self.vector_kind, queries, candidates) for s in self.shards]
            return top_candidates([h[0] for h in hits], [h[1] for h in hits], candidates)
        _, rows = self.qdrant.candidates(self.vector_kind, queries, candidates, len(self))
        return np.where(rows >= 0, rows // self.shard_size, -1), np.where(rows >= 0, rows % self.shard_size, -1)

    @torch.inference_mode()
    def search(
        self,
        captions: Sequence[str],
        top_k: int = 10,
        candidates: int = DEFAULT_CANDIDATES,
        *,
        directions: tuple[str, ...] | None = None,
    ) -> list[list[SearchHit]]:
        """Two-stage search: first-stage ANN for ``candidates`` images, exact ADAPT re-ranking.

        Args:
            captions: the queries.
            top_k: images returned per caption.
            candidates: K, images re-ranked per caption (over all shards together).
            directions: similarity directions for re-ranking (default: the model's own).

        Returns:
            Per caption, its ``top_k`` hits, best first.
        """
        if not 1 <= top_k <= candidates:
            raise ValueError(f"need 1 <= top_k <= candidates, got top_k={top_k}, "
                             f"candidates={candidates}")
        words, mask = self._encode_captions(captions)
        shard_of, rows = self._candidates(caption_queries(self.model, self.vector_kind, words, mask), candidates)
        results = []
        for q in range(len(captions)):
            found = rows[q] >= 0
            per_shard = [
                self._rerank(int(s), rows[q][found & (shard_of[q] == s)], words[q : q + 1],
                             mask[q : q + 1], top_k, directions)
                for s in np.unique(shard_of[q][found])
            ]
            results.append(self._hits(merge_top_k(per_shard, top_k), words[q : q + 1], mask[q : q + 1], directions))
        return results

    def _rerank(
        self,
        shard: int,
        rows: np.ndarray,
        words: torch.Tensor,
        mask: torch.Tensor,
        top_k: int,
        directions: tuple[str, ...] | None,
    ) -> list[tuple[float, tuple[int, int]]]:
        """One shard's exact scores of its candidate ``rows`` for one caption: its top ``top_k``."""
        rows = np.sort(rows)  # memmap reads in file order
        scores = self.shards[shard].exact_scores(self.model, rows, words, mask, directions)[:, 0]
        return merge_top_k([zip(scores.tolist(), ((shard, int(r)) for r in rows))], top_k)

    @torch.inference_mode()
    def search_exhaustive(
        self,
        captions: Sequence[str],
        top_k: int = 10,
        *,
        directions: tuple[str, ...] | None = None,
        progress: bool | None = None,
    ) -> list[list[SearchHit]]:
        """Exact ADAPT scores of every image against every caption: the ground truth for
        :meth:`search` (and its cost). Reads the gallery once, in chunks, for all captions.

        Args:
            progress: show a progress bar (default: for galleries of ``PROGRESS_MIN_ROWS`` or more).
        """
        words, mask = self._encode_captions(captions)
        d = self.model.config.latent_size
        chunk = max(1, SCORE_BATCH_BYTES // (4 * self.n_regions * d))
        show = len(self) >= PROGRESS_MIN_ROWS if progress is None else progress

        def chunks(bar: tqdm) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
            for s, shard in enumerate(self.shards):
                for start in range(0, shard.count, chunk):
                    stop = min(shard.count, start + chunk)
                    yield ([(s, row) for row in range(start, stop)],
                           shard.exact_scores(self.model, slice(start, stop), words, mask, directions))
                    bar.update(stop - start)

        with tqdm(total=len(self), unit="img", desc="exhaustive", disable=not show) as bar:
            best = best_per_caption(chunks(bar), len(captions), top_k)
        return [self._hits(hits, words[q : q + 1], mask[q : q + 1], directions) for q, hits in enumerate(best)]

    def _hits(
        self, found: list[tuple[float, tuple[int, int]]], words: torch.Tensor, mask: torch.Tensor,
        directions: tuple[str, ...] | None,
    ) -> list[SearchHit]:
        """One caption's ``(score, (shard, row))`` as :class:`SearchHit`, with its regions' shares."""
        if not found:
            return []
        where = [location for _, location in found]
        encoded = torch.from_numpy(np.stack([self.shards[s].regions[r] for s, r in where]))
        encoded = encoded.to(self.model.device, torch.float32)
        weights = hit_region_shares(self.model, encoded, words, mask, directions)
        neutral = neutral_region_shares(self.model, encoded, directions)
        hits = []
        for rank, (score, (s, r)) in enumerate(found):
            shard = self.shards[s]
            details = shard.details(r)
            boxes = np.array(shard.boxes[r])
            source = None if details is None or details.source is None else str(self.folder / details.source)
            hits.append(SearchHit(shard.ids[r], score, boxes_only(boxes) if details is None else details.regions(boxes),
                                  None if weights is None else weights[rank], source,
                                  None if neutral is None else neutral[rank]))
        return hits
