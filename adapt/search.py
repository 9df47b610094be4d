"""Two-stage gallery search over ADAPT image features, for galleries of millions of images.

ADAPT-T2I cannot be indexed like a two-tower model: the caption adapts every image's regions, so
scoring one (caption, image) pair costs ``n_regions x d`` exponentials, and exhaustive search over
a large gallery is far too slow for a query. Search therefore runs in two stages:

1. **First stage (query-independent vectors, ANN).** Every image gets one vector computed from its
   regions alone, every caption one computed from its words alone. Image vectors are indexed with
   FAISS under inner product: an exact ``IndexFlatIP`` while a shard is small, a compressed index
   with exact refinement once it is large (see :func:`build_ann`). Two kinds (``first_stage``):

   - ``"fovea-max"`` (default for models with T2I, ensembles included, whose T2I head it uses):
     ADAPT-T2I in the limit of a hard fovea. T2I pools ``sum_i M_ic B_ic`` per channel ``c``, with
     ``B`` the BatchNorm'ed regions and ``M`` a softmax over regions of ``lambda * s_c * B_ic``
     (``s = gamma(q) + 1``, ``beta = beta(q)``, ``q`` the caption's mean word); as ``lambda``
     grows this tends to ``ext_c = max_i B_ic`` where ``s_c > 0`` and ``min_i B_ic`` where
     ``s_c < 0``, and the score to ``cos(s * ext + beta, q)``. Its numerator
     ``q . (s * ext) + q . beta`` is an inner product between the image vector
     ``[max_i B_i, min_i B_i]`` and the caption vector ``[q * s * (s > 0), q * s * (s < 0)]``
     (``2d`` floats each) plus a constant per caption: FAISS finds the ``POOL_FACTOR * K`` best by
     it, and these are re-scored with the whole hard-fovea cosine (:func:`first_stage_scores`),
     whose per-image norm recovers most of what the numerator misses. No training needed.
   - ``"mean"``: the l2-normalised mean of the encoded regions against the l2-normalised masked
     mean of the words (the ADAPT query): the model's own global vectors, and the only choice for
     I2T-only models. On synthetic concept data (``benchmarks/search_scale.py``) it recalls far
     less of the exhaustive top-10: 0.48 with K = 1000 of 10k images and 0.18 of 100k, where
     ``"fovea-max"`` recalls 1.000 with K = 100 of 10k, 100k and 1M images.

   The ``candidates`` (K) best images by the first-stage score go on.

2. **Exact re-ranking.** The K candidates' stored regions are scored against the caption with the
   model's own :class:`~adapt.similarity.AdaptiveSimilarity` (its directions: T2I, I2T or the
   ensemble), and the ``top_k`` best are returned. In eval mode BatchNorm uses running statistics,
   so a pair's score does not depend on which other images are scored with it: re-ranking gives
   exactly the scores of exhaustive search, and with K = gallery size the same ranking.

Storage. An index is a folder::

    manifest.json        model fingerprint, first_stage, n_regions, shard_size, shards and row counts
    shard-00000/
        regions.npy      (shard_size, n_regions, d) float16: encoded regions, memory-mapped
        boxes.npy        (shard_size, n_regions, 4) float32: region boxes, NaN where not given
        ids.json         the image ids, in row order
        ann.faiss        the shard's FAISS index: its first-stage image vectors (read into RAM)
    shard-00001/ ...

The arrays are preallocated to ``shard_size`` rows when a shard is opened (sparse on disk until
written) and only the first ``count`` rows, as recorded in the manifest, are valid. ``add`` writes
into the last shard and starts a new one when it is full; full shards are never written again, so
adding images never rebuilds the existing index. The manifest is replaced last and atomically, so
an interrupted ``add`` leaves the index as it was before it (a FAISS file that ran ahead of the
manifest is cut back on open).

Sharding and the merge at query time. Each shard is self-contained (its arrays and its own FAISS
index), so shards can be served by different processes or machines, and a gallery larger than one
machine's RAM is spread over them. For each caption:

1. every shard returns its K best first-stage candidates as ``(first-stage score, row)``;
2. the coordinator keeps the K best of all of them (first-stage scores are comparable across
   shards: same model, same vectors), so re-ranking costs K pairs whatever the shard count;
3. every shard re-ranks its own share of those K with exact ADAPT scores and returns its
   ``top_k`` as ``(score, id)``;
4. the coordinator merges those lists with a heap (:func:`merge_top_k`) into the final ``top_k``.

Only the query and ``(score, id)`` lists cross shard boundaries, never image features: in
:class:`GalleryIndex` the shards are local folders called in turn, and a remote shard (holding a
copy of the model) needs to expose just :meth:`Shard.first_stage` and :meth:`Shard.exact_scores`.

Recall of the first stage against exhaustive ADAPT is what ``candidates`` trades against latency;
``benchmarks/search_scale.py`` measures it.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence, TypeVar

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adapt.io import atomic_write
from adapt.model import AdaptModel
from adapt.regions import ExtractorMismatchError, check_extractor
from adapt.similarity import masked_mean

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "adapt-gallery-index"
FORMAT_VERSION = 2  # 2: the model's config hash leaves out its extractor, compared by check_extractor
DEFAULT_SHARD_SIZE = 250_000
DEFAULT_CANDIDATES = 200  # twice the K that recalled the whole top-10 of 10k to 1M synthetic images
ANN_MIN_ROWS = 20_000  # below this an exact scan of a shard takes about a millisecond
REFINE_FACTOR = 8  # the compressed index re-scores exactly this many times the hits asked of it
POOL_FACTOR = 5  # "fovea-max": hits by inner product re-scored with the hard-fovea cosine, per K
ENCODE_BATCH = 512  # images per encode_regions call in add()
SCORE_BATCH_BYTES = 256 * 2**20  # float32 regions per exact-scoring chunk in search_exhaustive()
PROGRESS_MIN_ROWS = 10_000
OTHER_MODEL = ("Its stored region features only mean something to that model: open it with the model it was "
               "built with, or build a new index for this one with GalleryIndex.create")

T = TypeVar("T")
FirstStage = Literal["fovea-max", "mean"]
FIRST_STAGES = ("fovea-max", "mean")


class GalleryIndexError(RuntimeError):
    """An index that cannot be created, opened or used as asked (clear reason in the message)."""


@dataclass
class SearchResult:
    """The ``k`` best images for one caption, best first.

    Attributes:
        ids: image ids.
        scores: ``(k,)`` exact ADAPT scores.
        shards: ``(k,)`` shard number of each image.
        rows: ``(k,)`` row of each image inside its shard.
        boxes: ``(k, n_regions, 4)`` region boxes (NaN where none were given).
    """

    ids: list[str]
    scores: np.ndarray
    shards: np.ndarray
    rows: np.ndarray
    boxes: np.ndarray


# -- the math: pure functions ------------------------------------------------------------------


def image_vectors(model: AdaptModel, kind: FirstStage, regions: torch.Tensor) -> torch.Tensor:
    """First-stage image vectors (see the module docstring).

    ``regions (n, n_regions, d)`` encoded -> ``(n, 2d)`` for ``"fovea-max"``, ``(n, d)`` for ``"mean"``.
    """
    if kind == "mean":
        return F.normalize(regions.mean(dim=1), dim=-1)
    normed = model.similarity.heads["t2i"].prepare_images(regions)  # (n, n_regions, d)
    return torch.cat([normed.amax(dim=1), normed.amin(dim=1)], dim=-1)


def caption_queries(
    model: AdaptModel, kind: FirstStage, words: torch.Tensor, mask: torch.Tensor
) -> np.ndarray:
    """What the first stage needs of each caption (see the module docstring).

    ``words (n, t, d)`` encoded and ``mask (n, t)`` -> ``(n, 3d)`` float32 ``[q, s, beta]`` for
    ``"fovea-max"``, ``(n, d)`` unit ``q`` for ``"mean"``.
    """
    if kind == "mean":
        return F.normalize(masked_mean(words, mask), dim=-1).detach().float().cpu().numpy()
    captions = model.similarity.heads["t2i"].prepare_queries(words, mask)
    return torch.cat([captions.query, captions.scale, captions.shift], dim=-1).detach().float().cpu().numpy()


def ann_queries(kind: FirstStage, queries: np.ndarray) -> np.ndarray:
    """Caption vectors for the inner-product index: ``(n, 3d)`` or ``(n, d)`` -> ``(n, dim)``."""
    if kind == "mean":
        return queries
    query, scale, _ = np.split(queries, 3, axis=-1)
    weighted = query * scale
    return np.concatenate([weighted * (scale > 0), weighted * (scale < 0)], axis=-1)


def first_stage_scores(kind: FirstStage, query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """One caption's first-stage scores of images: ``query`` as from :func:`caption_queries`,
    image ``vectors (m, dim)`` -> ``(m,)``: the hard-fovea T2I cosine, or the cosine of means."""
    if kind == "mean":
        return vectors @ query
    mean_word, scale, shift = np.split(query, 3)
    d = len(mean_word)
    extreme = np.where(scale > 0, vectors[:, :d], vectors[:, d:])
    pooled = scale * extreme + shift
    norms = np.linalg.norm(pooled, axis=1) * np.linalg.norm(mean_word)
    return pooled @ mean_word / np.maximum(norms, 1e-12)


def vector_size(model: AdaptModel, kind: FirstStage) -> int:
    return model.config.latent_size * (2 if kind == "fovea-max" else 1)


def build_ann(vectors: np.ndarray) -> faiss.Index:
    """A FAISS inner-product index over first-stage ``vectors (n, dim)`` float32.

    ``IndexFlatIP`` (exact) below ``ANN_MIN_ROWS`` rows. Above, PQ fast-scan (4-bit codes, one
    sub-quantizer per 4 dimensions, trained on the first ``ANN_MIN_ROWS`` vectors) whose
    ``REFINE_FACTOR`` times as many best as asked are re-scored exactly (``IndexRefineFlat``), so
    the scores it returns are exact and comparable across shards, and it keeps the vectors for
    :meth:`faiss.Index.reconstruct_batch`. Measured on "fovea-max" vectors of 100k synthetic
    images (``benchmarks/search_scale.py``; one thread, per query in batches of 50), recall of the
    exhaustive ADAPT top-10 among the 300 best by inner product: flat 1.000 (13 ms), this index
    0.996 (1.2 ms), IVF-Flat with 512 lists 0.898 / 0.956 / 0.982 probing 32 / 64 / 128 lists
    (0.9 / 1.8 / 3.9 ms); HNSW (M 32, efSearch 256) found only 0.61 of the flat top-300. The
    vectors share a large common component, which coarse quantizers split badly.
    """
    n, dim = vectors.shape
    if n < ANN_MIN_ROWS:
        index: faiss.Index = faiss.IndexFlatIP(dim)
    else:
        factory = f"PQ{_subquantizers(dim)}x4fs,RFlat"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        index.k_factor = REFINE_FACTOR
        index.train(vectors[:ANN_MIN_ROWS])
    index.add(vectors)
    return index


def _subquantizers(dim: int) -> int:
    """The most PQ sub-quantizers of at least 4 dimensions that divide ``dim``."""
    return next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)


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


def merge_top_k(lists: Iterable[Iterable[tuple[float, T]]], k: int) -> list[tuple[float, T]]:
    """Global top ``k`` of several ``(score, item)`` lists (one per shard), best first.

    Only scores and items (ids, or ``(shard, row)``) are needed, so the lists may come from
    shards served anywhere.
    """
    return heapq.nlargest(k, chain.from_iterable(lists), key=lambda hit: hit[0])


def model_fingerprint(model: AdaptModel) -> dict[str, Any]:
    """What an index records about the model whose encoded regions it stores.

    ``config_sha256`` covers the architecture (the config without its free-form ``card`` and its
    ``extractor``, which :meth:`GalleryIndex.open` compares with :func:`adapt.regions.check_extractor`)
    and ``weights_sha256`` every tensor of the state dict, so a retrained model is told apart too.
    """
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("card", "extractor")}
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": weights.hexdigest(),
        "latent_size": model.config.latent_size,
        "region_dim": model.config.region_dim,
        "similarity": model.config.similarity,
        "extractor": model.config.extractor,
    }


# -- I/O ----------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half of it."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def _write_ann(path: Path, index: faiss.Index) -> None:
    atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))


def _float_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 tensor of an array, a read-only memmap slice, or a tensor (which stays put)."""
    if isinstance(values, torch.Tensor):
        return values.float()
    return torch.from_numpy(np.array(values, dtype=np.float32))


class Shard:
    """One self-contained part of a gallery: its arrays (memory-mapped) and its FAISS index.

    Attributes:
        folder: where it lives.
        count: valid rows.
        capacity: rows it can hold (the index's ``shard_size``).
        regions: ``(count, n_regions, d)`` float16 memmap of encoded regions.
        boxes: ``(count, n_regions, 4)`` float32 memmap.
        ids: ``count`` image ids.
        ann: the FAISS index holding the ``count`` first-stage image vectors.
    """

    def __init__(self, folder: Path, count: int, capacity: int) -> None:
        self.folder = folder
        self.capacity = capacity
        self.count = count
        try:
            self._files = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                           for name in ("regions", "boxes")}
            self.ids: list[str] = json.loads((folder / "ids.json").read_text())[:count]
            self.ann = faiss.read_index(str(folder / "ann.faiss"))
        except (OSError, ValueError, RuntimeError) as e:
            raise GalleryIndexError(f"shard {folder} is missing or unreadable ({e}); the index is "
                                    "damaged: rebuild it with GalleryIndex.create") from e
        if (len(self.ids) != count or self.ann.ntotal < count
                or any(len(a) != capacity for a in self._files.values())):
            raise GalleryIndexError(f"shard {folder} does not match the manifest ({count} rows of "
                                    f"{capacity}); the index is damaged: rebuild it")
        if self.ann.ntotal > count:  # an add was interrupted after the FAISS file was replaced
            self.ann = build_ann(self.ann.reconstruct_n(0, count))

    @property
    def regions(self) -> np.ndarray:
        return self._files["regions"][: self.count]

    @property
    def boxes(self) -> np.ndarray:
        return self._files["boxes"][: self.count]

    @classmethod
    def allocate(
        cls, folder: Path, capacity: int, n_regions: int, latent_size: int, vector_size: int
    ) -> "Shard":
        """Create an empty shard whose arrays hold ``capacity`` rows."""
        # A folder left by an add() that died before the manifest listed it is reused.
        folder.mkdir(parents=True, exist_ok=True)
        shapes = {"regions": ((capacity, n_regions, latent_size), np.float16),
                  "boxes": ((capacity, n_regions, 4), np.float32)}
        for name, (shape, dtype) in shapes.items():
            # open_memmap only extends the file to its full size: sparse until rows are written.
            path = folder / f"{name}.npy"
            np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
        _write_json(folder / "ids.json", [])
        _write_ann(folder / "ann.faiss", faiss.IndexFlatIP(vector_size))
        return cls(folder, 0, capacity)

    def append(
        self, regions: np.ndarray, vectors: np.ndarray, boxes: np.ndarray, ids: list[str]
    ) -> None:
        """Append ``n`` images: encoded ``regions (n, n_regions, d)``, first-stage ``vectors
        (n, dim)`` float32, ``boxes (n, n_regions, 4)`` and their ids.

        The arrays are written in place; the FAISS index and ids are saved by :meth:`save`.
        """
        start, stop = self.count, self.count + len(ids)
        for name, values in (("regions", regions.astype(np.float16)), ("boxes", boxes)):
            out = np.load(self.folder / f"{name}.npy", mmap_mode="r+")
            out[start:stop] = values
            out.flush()
        self.ids.extend(ids)
        self.count = stop
        self.ann.add(vectors)
        if isinstance(self.ann, faiss.IndexFlat) and stop >= ANN_MIN_ROWS:
            self.ann = build_ann(self.ann.reconstruct_n(0, stop))

    def save(self) -> None:
        """Persist the ids and the FAISS index (the arrays are already on disk)."""
        _write_json(self.folder / "ids.json", self.ids)
        _write_ann(self.folder / "ann.faiss", self.ann)

    def first_stage(
        self, kind: FirstStage, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """This shard's ``k`` best images for each caption by first-stage score.

        Args:
            kind: the index's first stage.
            queries: ``(n_captions, qdim)`` from :func:`caption_queries`.

        Returns:
            ``scores (n_captions, k')`` and ``rows (n_captions, k')``, best first (``-1``: no hit).
        """
        pool = min(self.count, k * (POOL_FACTOR if kind == "fovea-max" else 1))
        _, rows = self.ann.search(ann_queries(kind, queries), pool)
        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        for i, (query, found) in enumerate(zip(queries, rows)):
            hit = found >= 0
            scores[i, hit] = first_stage_scores(kind, query, self.ann.reconstruct_batch(found[hit]))
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(rows, best, axis=1)

    def _prefetch(self, rows: np.ndarray) -> None:
        """Ask the kernel to read these rows' regions now, all at once: when the gallery does not
        fit in the page cache, the missing rows then cost about one disk round trip together
        instead of one each as the memmap faults them in."""
        if not hasattr(os, "posix_fadvise"):  # not on macOS or Windows
            return
        regions = self._files["regions"]
        row_bytes = regions[0].nbytes
        fd = os.open(regions.filename, os.O_RDONLY)
        try:
            for row in rows:
                start = regions.offset + int(row) * row_bytes
                os.posix_fadvise(fd, start, row_bytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def exact_scores(
        self,
        model: AdaptModel,
        rows: np.ndarray | slice,
        words: torch.Tensor,
        mask: torch.Tensor,
        directions: tuple[str, ...] | None,
    ) -> np.ndarray:
        """ADAPT scores ``(len(rows), n_captions)`` of the given rows against encoded captions."""
        if not isinstance(rows, slice):
            self._prefetch(rows)
        picked = self.regions[rows]  # fancy indexing reads a copy; a slice is a read-only view
        # torch converts float16 to float32 faster than numpy does.
        half = torch.from_numpy(picked if picked.flags.writeable else np.array(picked))
        regions = half.to(model.device, torch.float32)
        return model.similarity(regions, words, mask, directions=directions).scores.float().cpu().numpy()


# -- the index ------------------------------------------------------------------------------------


class GalleryIndex:
    """A sharded, memory-mapped gallery of encoded images with two-stage ADAPT search.

    Build with :meth:`create` + :meth:`add`, load with :meth:`open`, query with :meth:`search`
    (see the module docstring for the design). The model is put in eval mode: BatchNorm must use
    its running statistics for scores to be per pair.

    Example::

        index = GalleryIndex.create("gallery", model)
        index.add(region_features, boxes, ids)            # (n, r, region_dim), (n, r, 4), n ids
        index = GalleryIndex.open("gallery", model)       # later, memory-mapped
        hits = index.search(["a dog on a bench"], top_k=10)[0]
        hits.ids, hits.scores
    """

    def __init__(self, folder: Path, model: AdaptModel, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.model = model.eval()
        self._manifest = manifest
        self.shards = [Shard(folder / s["name"], s["count"], manifest["shard_size"])
                       for s in manifest["shards"]]

    @property
    def shard_size(self) -> int:
        return int(self._manifest["shard_size"])

    @property
    def first_stage(self) -> FirstStage:
        """The kind of first-stage vectors, ``"fovea-max"`` or ``"mean"`` (module docstring)."""
        return self._manifest["first_stage"]

    @property
    def n_regions(self) -> int | None:
        """Regions per image, fixed by the first :meth:`add` (None while empty)."""
        return self._manifest["n_regions"]

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    @classmethod
    def create(
        cls,
        folder: str | Path,
        model: AdaptModel,
        shard_size: int = DEFAULT_SHARD_SIZE,
        first_stage: FirstStage | None = None,
    ) -> "GalleryIndex":
        """Start an empty index in ``folder`` (which must not hold one) for ``model``'s features.

        Args:
            shard_size: images per shard: the unit that is preallocated, memory-mapped and can be
                served from its own machine.
            first_stage: ``"fovea-max"`` (default when the model has T2I) or ``"mean"`` (default
                for I2T-only models); see the module docstring.
        """
        folder = Path(folder)
        if shard_size < 1:
            raise GalleryIndexError(f"shard_size must be positive, got {shard_size}")
        has_t2i = "t2i" in model.config.directions
        first_stage = first_stage or ("fovea-max" if has_t2i else "mean")
        if first_stage not in FIRST_STAGES:
            raise GalleryIndexError(f"first_stage={first_stage!r} is not one of {FIRST_STAGES}")
        if first_stage == "fovea-max" and not has_t2i:
            raise GalleryIndexError("first_stage='fovea-max' is derived from the T2I head and this "
                                    f"model is {model.config.similarity!r}: use first_stage='mean'")
        if (folder / MANIFEST_NAME).exists():
            raise GalleryIndexError(f"{folder} already holds a gallery index: open it with "
                                    "GalleryIndex.open, or pick an empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": model_fingerprint(model),
                    "first_stage": first_stage, "shard_size": shard_size, "n_regions": None,
                    "shards": [], "count": 0}
        _write_json(folder / MANIFEST_NAME, manifest)
        return cls(folder, model, manifest)

    @classmethod
    def open(cls, folder: str | Path, model: AdaptModel) -> "GalleryIndex":
        """Open an index built for ``model``; its arrays are memory-mapped, not read into RAM.

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
        stored, current = manifest["model"], model_fingerprint(model)
        differ = [k for k in stored if k != "extractor" and stored[k] != current.get(k)]
        if differ:
            details = "; ".join(f"{k}: index {stored[k]!r}, model {current.get(k)!r}" for k in differ)
            raise GalleryIndexError(f"{folder} was built with a different model ({details}). {OTHER_MODEL}")
        if stored["extractor"] is not None or current["extractor"] is not None:
            try:
                check_extractor(stored["extractor"], current["extractor"], names=("index", "model"),
                                advice=OTHER_MODEL)
            except ExtractorMismatchError as e:
                raise GalleryIndexError(f"{folder} was built with a different model: {e}") from e
        return cls(folder, model, manifest)

    # -- building ----------------------------------------------------------------------------

    def add(
        self,
        region_features: np.ndarray | torch.Tensor,
        boxes: np.ndarray | torch.Tensor | None,
        ids: Sequence[str],
    ) -> None:
        """Encode and append images; existing shards are not rewritten.

        Args:
            region_features: ``(n, n_regions, region_dim)`` region features (a memmap works: it is
                read ``ENCODE_BATCH`` images at a time).
            boxes: ``(n, n_regions, 4)`` region boxes, or None (stored as NaN).
            ids: ``n`` image ids, kept in order.
        """
        n = len(region_features)
        self._check_add(region_features, boxes, ids)
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
                vectors = image_vectors(self.model, self.first_stage, encoded)
                batch_boxes = (np.full((stop - start, self.n_regions, 4), np.nan, np.float32)
                               if boxes is None else np.asarray(boxes[start:stop], dtype=np.float32))
                shard.append(encoded.float().cpu().numpy(), vectors.float().cpu().numpy(),
                             batch_boxes, [str(i) for i in ids[start:stop]])
                touched.add(len(self.shards) - 1)
                progress.update(stop - start)
                start = stop
        for i in sorted(touched):
            self.shards[i].save()
        self._manifest["shards"] = [{"name": s.folder.name, "count": s.count} for s in self.shards]
        self._manifest["count"] = len(self)
        _write_json(self.folder / MANIFEST_NAME, self._manifest)

    def _check_add(self, features: Any, boxes: Any, ids: Sequence[str]) -> None:
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
        if len(ids) != n:
            raise ValueError(f"got {n} images but {len(ids)} ids")

    def _open_shard(self) -> Shard:
        """The shard that takes the next rows: the last one, or a new one when it is full."""
        if not self.shards or self.shards[-1].count == self.shard_size:
            folder = self.folder / f"shard-{len(self.shards):05d}"
            self.shards.append(Shard.allocate(
                folder, self.shard_size, self.n_regions, self.model.config.latent_size,
                vector_size(self.model, self.first_stage)))
        return self.shards[-1]

    # -- searching ---------------------------------------------------------------------------

    def _encode_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str) or not captions:
            raise ValueError("captions must be a non-empty list of strings")
        if not len(self):
            raise GalleryIndexError(f"{self.folder} holds no images yet: add some with .add()")
        return self.model.encode_text(list(captions))

    @torch.inference_mode()
    def search(
        self,
        captions: Sequence[str],
        top_k: int = 10,
        candidates: int = DEFAULT_CANDIDATES,
        *,
        directions: tuple[str, ...] | None = None,
    ) -> list[SearchResult]:
        """Two-stage search: first-stage ANN for ``candidates`` images, exact ADAPT re-ranking.

        Args:
            captions: the queries.
            top_k: images returned per caption.
            candidates: K, images re-ranked per caption (over all shards together).
            directions: similarity directions for re-ranking (default: the model's own).

        Returns:
            One :class:`SearchResult` per caption.
        """
        if not 1 <= top_k <= candidates:
            raise ValueError(f"need 1 <= top_k <= candidates, got top_k={top_k}, "
                             f"candidates={candidates}")
        words, mask = self._encode_captions(captions)
        queries = caption_queries(self.model, self.first_stage, words, mask)
        hits = [s.first_stage(self.first_stage, queries, candidates) for s in self.shards]
        shard_of, rows = top_candidates([h[0] for h in hits], [h[1] for h in hits], candidates)
        results = []
        for q in range(len(captions)):
            found = rows[q] >= 0
            per_shard = [
                self._rerank(int(s), rows[q][found & (shard_of[q] == s)], words[q : q + 1],
                             mask[q : q + 1], top_k, directions)
                for s in np.unique(shard_of[q][found])
            ]
            results.append(self._result(merge_top_k(per_shard, top_k)))
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
    ) -> list[SearchResult]:
        """Exact ADAPT scores of every image against every caption: the ground truth for
        :meth:`search` (and its cost). Reads the gallery once, in chunks, for all captions.

        Args:
            progress: show a progress bar (default: for galleries of ``PROGRESS_MIN_ROWS`` or more).
        """
        words, mask = self._encode_captions(captions)
        d = self.model.config.latent_size
        chunk = max(1, SCORE_BATCH_BYTES // (4 * self.n_regions * d))
        best: list[list[tuple[float, tuple[int, int]]]] = [[] for _ in captions]
        show = len(self) >= PROGRESS_MIN_ROWS if progress is None else progress
        with tqdm(total=len(self), unit="img", desc="exhaustive", disable=not show) as bar:
            for s, shard in enumerate(self.shards):
                for start in range(0, shard.count, chunk):
                    stop = min(shard.count, start + chunk)
                    scores = shard.exact_scores(self.model, slice(start, stop), words, mask, directions)
                    for q in range(len(captions)):
                        top = np.argsort(-scores[:, q], kind="stable")[:top_k]
                        new = [(float(scores[i, q]), (s, start + int(i))) for i in top]
                        best[q] = merge_top_k([best[q], new], top_k)
                    bar.update(stop - start)
        return [self._result(hits) for hits in best]

    def _result(self, hits: list[tuple[float, tuple[int, int]]]) -> SearchResult:
        shards = np.array([s for _, (s, _) in hits], dtype=np.int64)
        rows = np.array([r for _, (_, r) in hits], dtype=np.int64)
        return SearchResult(
            ids=[self.shards[s].ids[r] for s, r in zip(shards, rows)],
            scores=np.array([score for score, _ in hits], dtype=np.float32),
            shards=shards,
            rows=rows,
            boxes=np.stack([self.shards[s].boxes[r] for s, r in zip(shards, rows)]),
        )
