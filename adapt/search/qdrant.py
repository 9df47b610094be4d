"""A gallery index's first stage on Qdrant: one collection for the whole gallery, served embedded
or by a server or cluster, with the same code.

With :class:`QdrantFirstStage` a :class:`~adapt.search.GalleryIndex` keeps its first-stage vectors
("fovea-max" or "mean", :mod:`adapt.search.candidates`) in a Qdrant collection instead of one
FAISS index per shard: each image is a point whose id is its row in the whole gallery (shard
number times ``shard_size`` plus its row in the shard), its vector the first-stage image vector
under a dot-product distance, its payload that row again. Qdrant finds the ``POOL_FACTOR * K``
best by inner product; they are re-scored with the hard-fovea cosine and re-ranked with exact
ADAPT scores exactly as with FAISS, from the index's own memory-mapped shards. A gallery whose
first stage outgrows one machine is then sharded and replicated by a Qdrant cluster.

Where the collection lives (``location``):

- ``"http://host:6333"`` / ``"https://..."``: a Qdrant server or cluster (``QDRANT_API_KEY`` in
  the environment is its API key);
- ``":memory:"``: embedded, in this process only (tests);
- any other string: an embedded collection stored in that folder (relative: inside the index
  folder), which one process at a time may open.

Consistency with the manifest: points are upserted before the manifest counts them, so an add that
dies leaves points beyond ``count``; searches only consider points whose row is below it, and the
next add overwrites them (same ids). Needs the optional ``qdrant-client`` package
(``pip install "adapt[qdrant]"``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adapt.search.candidates import VectorKind, ann_queries, pool_size, rescore
from adapt.search.shard import GalleryIndexError

UPSERT_BATCH = 1024  # points per upsert request
SERVER_PREFIXES = ("http://", "https://")


def _client_module() -> Any:
    try:
        import qdrant_client
    except ImportError as e:
        raise GalleryIndexError("this index's first stage is a Qdrant collection, which needs the optional "
                                'qdrant-client package: pip install "adapt[qdrant]"') from e
    return qdrant_client


class QdrantFirstStage:
    """The first-stage vectors of one gallery in a Qdrant collection (module docstring).

    Args:
        client: a ``qdrant_client.QdrantClient``.
        collection: the collection's name.
        location: where ``client`` connects (recorded in the manifest so the index reopens it), or
            ``None`` for a client that cannot be reconnected from a string (then
            :meth:`GalleryIndex.open <adapt.search.GalleryIndex.open>` needs it passed in).
    """

    def __init__(self, client: Any, collection: str, location: str | None = None) -> None:
        self.client = client
        self.collection = collection
        self.location = location

    @classmethod
    def connect(cls, location: str, collection: str, folder: str | Path | None = None) -> "QdrantFirstStage":
        """Connect to the collection at ``location`` (module docstring); a relative folder is
        taken inside ``folder``, the index's."""
        qdrant_client = _client_module()
        if location.startswith(SERVER_PREFIXES):
            client = qdrant_client.QdrantClient(url=location, api_key=os.environ.get("QDRANT_API_KEY"))
        elif location == ":memory:":
            client = qdrant_client.QdrantClient(location=location)
        else:
            path = Path(location) if folder is None else Path(folder) / location
            path.mkdir(parents=True, exist_ok=True)
            try:
                client = qdrant_client.QdrantClient(path=str(path))
            except RuntimeError as e:  # "Storage folder ... is already accessed by another instance"
                raise GalleryIndexError(f"cannot open the embedded Qdrant collection in {path} ({e}); one process "
                                        "at a time may use a local collection: serve it from a Qdrant server "
                                        "to share it") from e
        return cls(client, collection, location)

    @property
    def serves_others(self) -> bool:
        """Whether the collection is on a server, which other processes may use meanwhile (an
        unknown client counts as one)."""
        return self.location is None or self.location.startswith(SERVER_PREFIXES)

    def describe(self) -> dict[str, Any]:
        """What the manifest records to reconnect."""
        return {"kind": "qdrant", "location": self.location, "collection": self.collection}

    def close(self) -> None:
        """Release the client (an embedded collection's folder lock with it)."""
        self.client.close()

    def create(self, vector_size: int) -> None:
        """Create the collection for vectors of ``vector_size`` floats (dot product).

        Raises:
            GalleryIndexError: it exists already (another gallery's, or a deleted index's).
        """
        models = _client_module().models
        if self.client.collection_exists(self.collection):
            raise GalleryIndexError(f"Qdrant collection {self.collection!r} exists already: pick another "
                                    "collection name, or delete it first")
        self.client.create_collection(
            self.collection, vectors_config=models.VectorParams(size=vector_size, distance=models.Distance.DOT))
        if self.serves_others and self.location is not None:  # payload indexes only matter on a server
            self.client.create_payload_index(self.collection, "row", models.PayloadSchemaType.INTEGER)

    def check(self, vector_size: int) -> None:
        """Refuse a collection that is missing or holds vectors of another size."""
        if not self.client.collection_exists(self.collection):
            raise GalleryIndexError(f"the index's Qdrant collection {self.collection!r} is missing at "
                                    f"{self.location or 'the given client'}: rebuild the index")
        size = self.client.get_collection(self.collection).config.params.vectors.size
        if size != vector_size:
            raise GalleryIndexError(f"Qdrant collection {self.collection!r} holds vectors of {size} floats, "
                                    f"this index's first stage has {vector_size}: rebuild the index")

    def add(self, start: int, vectors: np.ndarray) -> None:
        """Upsert first-stage ``vectors (n, dim)`` as the points of gallery rows ``start ...``."""
        models = _client_module().models
        for offset in range(0, len(vectors), UPSERT_BATCH):
            chunk = vectors[offset:offset + UPSERT_BATCH]
            rows = list(range(start + offset, start + offset + len(chunk)))
            self.client.upsert(self.collection, wait=True, points=models.Batch(
                ids=rows, vectors=chunk.astype(np.float32).tolist(), payloads=[{"row": r} for r in rows]))

    def candidates(
        self, kind: VectorKind, queries: np.ndarray, k: int, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best gallery rows below ``count`` per caption by first-stage score.

        Args:
            queries: ``(n_captions, qdim)`` from :func:`~adapt.search.candidates.caption_queries`.

        Returns:
            ``scores (n_captions, k')`` and gallery ``rows (n_captions, k')``, best first (``-1``: no hit).
        """
        models = _client_module().models
        valid = None
        # A server may hold points a builder is adding now; an embedded collection (one process)
        # only those of an add that died, which cost the filter, slow there, only until overwritten.
        if self.serves_others or self.client.count(self.collection).count > count:
            valid = models.Filter(must=[models.FieldCondition(key="row", range=models.Range(lt=count))])
        limit = min(count, pool_size(kind, k))
        answers = self.client.query_batch_points(self.collection, requests=[
            models.QueryRequest(query=vector.tolist(), limit=limit, filter=valid, with_vector=True)
            for vector in ann_queries(kind, queries)])
        found: Sequence[np.ndarray] = [np.array([int(p.id) for p in a.points], dtype=np.int64) for a in answers]
        vectors = [np.array([p.vector for p in a.points], dtype=np.float32) for a in answers]
        return rescore(kind, queries, found, vectors, k)
