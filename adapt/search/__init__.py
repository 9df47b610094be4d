"""Two-stage gallery search over ADAPT image features, for galleries of millions of images.

ADAPT-T2I cannot be indexed like a two-tower model: the caption adapts every image's regions, so
scoring one (caption, image) pair costs ``n_regions x d`` exponentials, and exhaustive search over
a large gallery is far too slow for a query. Search therefore runs in two stages, one module each:

- :mod:`adapt.search.candidates`: the maths of the first stage, query-independent vectors of
  images and captions (a hard-fovea limit of T2I, or the mean vectors) and the FAISS index over
  the image vectors, which picks ``candidates`` (K) images per caption;
- :mod:`adapt.search.index`: :class:`GalleryIndex`, the coordinator: it gathers every shard's
  candidates, has them re-ranked with exact ADAPT scores and merges the shards' results;
- :mod:`adapt.search.shard`: the storage, self-contained memory-mapped shards that grow by
  appending and can be served from separate machines;
- :mod:`adapt.search.fingerprint`: what an index records about its model, so that it refuses to be
  opened with another one;
- :mod:`adapt.search.qdrant`: the first stage on a Qdrant collection instead of FAISS (optional),
  embedded or on a server or cluster.

Its results are those of every gallery (:mod:`adapt.gallery`): lists of
:class:`~adapt.gallery.SearchHit`.

Recall of the first stage against exhaustive ADAPT is what ``candidates`` trades against latency;
``benchmarks/search_scale.py`` measures it.

Example::

    from adapt.search import GalleryIndex

    index = GalleryIndex.create("gallery", model)
    index.add(region_features, boxes, ids)            # (n, r, region_dim), (n, r, 4), n ids
    hits = GalleryIndex.open("gallery", model).search(["a dog on a bench"], top_k=10)[0]

``python -m training.index`` builds one from a folder of images or of extracted features.
"""

from adapt.gallery import merge_top_k
from adapt.search.candidates import (
    ANN_MIN_ROWS,
    POOL_FACTOR,
    REFINE_FACTOR,
    VECTOR_KINDS,
    VectorKind,
    ann_queries,
    build_ann,
    caption_queries,
    first_stage_scores,
    image_vectors,
)
from adapt.search.fingerprint import fingerprint_differences, model_fingerprint
from adapt.search.index import DEFAULT_CANDIDATES, DEFAULT_SHARD_SIZE, GalleryIndex, top_candidates
from adapt.search.qdrant import QdrantFirstStage
from adapt.search.shard import GalleryIndexError, ImageDetails, Shard

__all__ = [
    "ANN_MIN_ROWS",
    "DEFAULT_CANDIDATES",
    "DEFAULT_SHARD_SIZE",
    "POOL_FACTOR",
    "REFINE_FACTOR",
    "VECTOR_KINDS",
    "GalleryIndex",
    "GalleryIndexError",
    "ImageDetails",
    "QdrantFirstStage",
    "Shard",
    "VectorKind",
    "ann_queries",
    "build_ann",
    "caption_queries",
    "fingerprint_differences",
    "first_stage_scores",
    "image_vectors",
    "merge_top_k",
    "model_fingerprint",
    "top_candidates",
]
