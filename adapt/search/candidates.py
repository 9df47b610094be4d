"""The first stage of gallery search, which finds the candidates: one query-independent vector per
image and per caption, and the FAISS index over the image vectors.

Every image gets one vector computed from its regions alone, every caption one computed from its
words alone. Image vectors are indexed with FAISS under inner product: an exact ``IndexFlatIP``
while a shard is small, a compressed index with exact refinement once it is large (see
:func:`build_ann`). Two kinds (:data:`VectorKind`):

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
  I2T-only models. It recalls far less of the exhaustive top-10 than ``"fovea-max"``
  (``python -m benchmarks.search_scale`` measures both; the README has the dated numbers).

The ``candidates`` (K) best images by the first-stage score go on to exact re-ranking
(:mod:`adapt.search.index`).
"""

from __future__ import annotations

from typing import Literal, Sequence

import faiss
import numpy as np
import torch

from adapt.model import AdaptModel
from adapt.similarity import MeanPooled

ANN_MIN_ROWS = 20_000  # below this an exact scan of a shard takes about a millisecond
REFINE_FACTOR = 8  # the compressed index re-scores exactly this many times the hits asked of it
POOL_FACTOR = 5  # "fovea-max": hits by inner product re-scored with the hard-fovea cosine, per K

VectorKind = Literal["fovea-max", "mean"]
VECTOR_KINDS = ("fovea-max", "mean")


def image_vectors(model: AdaptModel, kind: VectorKind, regions: torch.Tensor) -> torch.Tensor:
    """First-stage image vectors (see the module docstring).

    ``regions (n, n_regions, d)`` encoded -> ``(n, 2d)`` for ``"fovea-max"``, ``(n, d)`` for ``"mean"``.
    """
    if kind == "mean":
        return MeanPooled.image_vectors(regions)
    normed = model.similarity.heads["t2i"].prepare_images(regions)  # (n, n_regions, d)
    return torch.cat([normed.amax(dim=1), normed.amin(dim=1)], dim=-1)


def caption_queries(
    model: AdaptModel, kind: VectorKind, words: torch.Tensor, mask: torch.Tensor
) -> np.ndarray:
    """What the first stage needs of each caption (see the module docstring).

    ``words (n, t, d)`` encoded and ``mask (n, t)`` -> ``(n, 3d)`` float32 ``[q, s, beta]`` for
    ``"fovea-max"``, ``(n, d)`` unit ``q`` for ``"mean"``.
    """
    if kind == "mean":
        return MeanPooled.caption_vectors(words, mask).detach().float().cpu().numpy()
    captions = model.similarity.heads["t2i"].prepare_queries(words, mask)
    return torch.cat([captions.query, captions.scale, captions.shift], dim=-1).detach().float().cpu().numpy()


def ann_queries(kind: VectorKind, queries: np.ndarray) -> np.ndarray:
    """Caption vectors for the inner-product index: ``(n, 3d)`` or ``(n, d)`` -> ``(n, dim)``."""
    if kind == "mean":
        return queries
    query, scale, _ = np.split(queries, 3, axis=-1)
    weighted = query * scale
    return np.concatenate([weighted * (scale > 0), weighted * (scale < 0)], axis=-1)


def first_stage_scores(kind: VectorKind, query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
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


def pool_size(kind: VectorKind, k: int) -> int:
    """Hits asked of the inner-product index to keep ``k`` candidates: ``POOL_FACTOR * k`` for
    ``"fovea-max"`` (re-scored by :func:`rescore`), ``k`` for ``"mean"`` (whose inner product is
    its score)."""
    return k * (POOL_FACTOR if kind == "fovea-max" else 1)


def rescore(
    kind: VectorKind, queries: np.ndarray, found: Sequence[np.ndarray], vectors: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each caption's pool of hits by first-stage score, whatever index found them.

    Args:
        queries: ``(n_captions, qdim)`` from :func:`caption_queries`.
        found: per caption, the rows the inner-product index returned.
        vectors: per caption, those rows' first-stage vectors ``(len(found[i]), dim)``.

    Returns:
        ``scores (n_captions, k')`` and ``rows (n_captions, k')``, best first, ``k'`` the largest
        pool or ``k`` if smaller; ``-inf`` and ``-1`` pad a caption with fewer hits.
    """
    width = min(k, max((len(f) for f in found), default=0))
    scores = np.full((len(queries), width), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), width), -1, dtype=np.int64)
    for i, (query, hits, hit_vectors) in enumerate(zip(queries, found, vectors)):
        if len(hits):
            pooled = first_stage_scores(kind, query, np.asarray(hit_vectors, dtype=np.float32))
            best = np.argsort(-pooled, kind="stable")[:width]
            scores[i, :len(best)], rows[i, :len(best)] = pooled[best], np.asarray(hits)[best]
    return scores, rows


def vector_size(model: AdaptModel, kind: VectorKind) -> int:
    """Floats per first-stage image vector: ``2d`` for ``"fovea-max"``, ``d`` for ``"mean"``."""
    return model.config.latent_size * (2 if kind == "fovea-max" else 1)


def build_ann(vectors: np.ndarray) -> faiss.Index:
    """A FAISS inner-product index over first-stage ``vectors (n, dim)`` float32.

    ``IndexFlatIP`` (exact) below ``ANN_MIN_ROWS`` rows. Above, PQ fast-scan (4-bit codes, one
    sub-quantizer per 4 dimensions, trained on the first ``ANN_MIN_ROWS`` vectors) whose
    ``REFINE_FACTOR`` times as many best as asked are re-scored exactly (``IndexRefineFlat``), so
    the scores it returns are exact and comparable across shards, and it keeps the vectors for
    :meth:`faiss.Index.reconstruct_batch`. Chosen over IVF-Flat and HNSW because the vectors share a
    large common component, which coarse quantizers split badly (the README's "Search a gallery in
    a Space" section has the measured recalls and latencies).
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


def extend_ann(index: faiss.Index, vectors: np.ndarray) -> faiss.Index:
    """``index`` with first-stage ``vectors (n, dim)`` added: the same index, or the compressed one
    of :func:`build_ann` over all its vectors once an exact index reaches ``ANN_MIN_ROWS``."""
    index.add(vectors)
    if isinstance(index, faiss.IndexFlat) and index.ntotal >= ANN_MIN_ROWS:
        return build_ann(index.reconstruct_n(0, index.ntotal))
    return index


def _subquantizers(dim: int) -> int:
    """The most PQ sub-quantizers of at least 4 dimensions that divide ``dim``."""
    return next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)
