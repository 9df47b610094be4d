"""Two-stage gallery search at scale: query latency and recall@10 against exhaustive ADAPT scoring.

Synthetic galleries (features generated, not extracted) with concept structure: each image has
``REGIONS`` region features, ``CONCEPTS_PER_IMAGE`` of which are noisy prototypes of concepts and
the rest noise; a caption names concepts. A T2I model is trained briefly on that structure so that
both the first stage and the ADAPT scores mean something. A
:class:`adapt.search.GalleryIndex` grows through the sizes (10k, then 90k more, then 900k more:
incremental adds), and at each size:

- exhaustive ADAPT top-10 of the query captions (the ground truth; its time is reported; large
  galleries use fewer queries for it, bounded by ``--exhaustive-pairs``);
- for each number of candidates K: p50 / p95 latency of one-caption ``search`` calls (first stage
  + re-ranking) over ``--queries`` captions, and recall@10 of the two-stage top-10 against the
  exhaustive top-10;
- the same at the default K on the freshly opened index, with the regions evicted from the page
  cache before every query (as when the gallery does not fit in RAM), before anything else reads
  the gallery.

This is done for the default ``"fovea-max"`` first stage and, as the baseline, for the model's own
global vectors (``"mean"``), whose index stops growing at ``--baseline-max-size`` to save disk.
Two more paths at the default K, with their latency and recall against the same ground truth:

- ``app``: the app's own search action (``app.Demo.search`` serving the "fovea-max" index, as
  ``python app.py --gallery`` does): search, then the drawings of the ``top_k`` results and of the
  selected one (every synthetic image shows one shared placeholder thumbnail);
- ``qdrant``: the same index with its first stage in an embedded Qdrant collection
  (``adapt.search.qdrant``, local mode) instead of FAISS, up to ``--qdrant-max-size`` images
  (local mode scans every point in Python: it is for tests and small galleries, a Qdrant server for
  large ones).

Every number here is measured on synthetic images; only the timings are real.

Latent 256 and 36 regions in float16 are 18 KiB per image (18 GiB at 1M, plus 2 KiB of
"fovea-max" vector in FAISS and 0.6 KiB of boxes); the script prints the sizes and refuses to start
without the disk for them. The gallery is written under ``--work`` and deleted at the end
(``--keep`` keeps it). The timings are of one process on this machine: at 1M the regions may not
fit in the page cache, and re-ranking then reads candidates from disk.

    python -m benchmarks.search_scale                              # 10k, 100k, 1M
    python -m benchmarks.search_scale --sizes 10000 100000 --candidates 300 1000
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from PIL import Image

import app
import app_logic
from adapt import AdaptConfig, AdaptModel, build_vocab
from adapt.gallery import SearchHit
from adapt.pipeline import Retriever
from adapt.regions import build_extractor
from adapt.search import (
    ANN_MIN_ROWS,
    DEFAULT_CANDIDATES,
    POOL_FACTOR,
    REFINE_FACTOR,
    VECTOR_KINDS,
    GalleryIndex,
    ImageDetails,
    QdrantFirstStage,
)
from training.synthetic import ConceptImages, concept_images, concept_prototypes, train_briefly

LATENT, REGIONS, REGION_DIM = 256, 36, 64
N_CONCEPTS, CONCEPTS_PER_IMAGE, NOISE = 200, 3, 0.5
ADD_CHUNK = 50_000  # images generated and added per call: bounds RAM, not the gallery
RESULTS = Path(__file__).resolve().parent / "results"
PATH_COLOURS = {"app)": "C8", "qdrant)": "C9"}  # the app's search action, the Qdrant first stage


def gallery_images(n: int, seed: int, protos: np.ndarray) -> ConceptImages:
    """``n`` images ``(n, REGIONS, REGION_DIM)`` and a caption naming each one's concepts."""
    return concept_images(n, protos, REGIONS, seed, CONCEPTS_PER_IMAGE, NOISE)


def train_model(protos: np.ndarray, steps: int, batch: int) -> AdaptModel:
    """A T2I model trained for ``steps`` batches of fresh concept images (hinge loss, Adamax)."""
    torch.manual_seed(0)
    config = AdaptConfig(region_dim=REGION_DIM, latent_size=LATENT, similarity="t2i", word_vectors="random",
                         word_dim=32, vocab=build_vocab(f"thing{c}" for c in range(N_CONCEPTS)),
                         card={"data": "benchmarks/search_scale.py synthetic concepts"})
    fresh = (gallery_images(batch, 10_000_000 + step, protos) for step in range(steps))
    return train_briefly(AdaptModel(config), ((images.features, images.captions) for images in fresh), lr=4e-3).eval()


def load_or_train(folder: Path, protos: np.ndarray, steps: int, batch: int) -> AdaptModel:
    if (folder / "model.safetensors").exists():
        model = AdaptModel.from_pretrained(folder)
        if (model.config.region_dim, model.config.latent_size) == (REGION_DIM, LATENT):
            print(f"model: reusing {folder}")
            return model
    start = time.perf_counter()
    model = train_model(protos, steps, batch)
    model.save_pretrained(folder)
    print(f"model: trained {steps} steps of {batch} images in {time.perf_counter() - start:.0f} s")
    return model


def grow(index: GalleryIndex, size: int, protos: np.ndarray, placeholder: ImageDetails | None = None) -> float:
    """Add generated images until the index holds ``size``; returns the seconds it took.

    ``placeholder``: the details of every image (for the app to draw a hit), or none.
    """
    start = time.perf_counter()
    while len(index) < size:
        n = min(ADD_CHUNK, size - len(index))
        features = gallery_images(n, len(index), protos).features  # seeded by position: reproducible
        boxes = None
        if placeholder is not None:  # boxes somewhere in the placeholder, for the drawings
            corners = np.random.default_rng(len(index)).uniform(0, 0.5, (n, REGIONS, 2)) * placeholder.image_size
            boxes = np.concatenate([corners, corners + np.array(placeholder.image_size) / 2], axis=-1)
        index.add(features, boxes, [f"synthetic-{len(index) + i}" for i in range(n)],
                  None if placeholder is None else [placeholder] * n)
    return time.perf_counter() - start


def placeholder_details(folder: Path) -> ImageDetails:
    """One thumbnail file and unlabelled regions, shown for every synthetic image."""
    path = folder / "placeholder.jpg"
    Image.new("RGB", (384, 288), (90, 120, 150)).save(path)
    return ImageDetails([""] * REGIONS, [0.0] * REGIONS, [False] * REGIONS, (384, 288), str(path))


def app_demo(model: AdaptModel, index: GalleryIndex, folder: Path) -> app.Demo:
    """The app's logic serving ``index`` (its extractor, which no synthetic image needs, is the default)."""
    retriever = Retriever(model, extractor=build_extractor(), allow_extractor_mismatch=True)
    return app.Demo(retriever, app_logic.DrawingFiles(folder / "drawings", keep=100), served=index)


def timed_app_searches(demo: app.Demo, captions: list[str], top_k: int = 10) -> tuple[list[list[SearchHit]], np.ndarray]:
    """One call of the app's search action per caption: the hits it kept and milliseconds."""
    state = demo.empty_state()
    demo.search(captions[0], top_k, state)  # warm-up
    results, ms = [], []
    for caption in captions:
        start = time.perf_counter()
        state = demo.search(caption, top_k, state)[-1]
        ms.append(1000 * (time.perf_counter() - start))
        results.append(state["hits"])
    return results, np.array(ms)


def recall_at_10(found: list[list[SearchHit]], truth: list[list[SearchHit]]) -> float:
    """Mean share of each caption's true top-10 keys among the found ones."""
    return float(np.mean([len({h.key for h in f} & {h.key for h in t}) / len(t) for f, t in zip(found, truth)]))


def evict_regions(index: GalleryIndex) -> None:
    """Drop the index's region files (only those) from the page cache, as on a machine whose RAM
    cannot hold the gallery: re-ranking then reads every candidate from disk."""
    for shard in index.shards:
        fd = os.open(shard.folder / "regions.npy", os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages, fresh from add(), cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_searches(
    index: GalleryIndex, captions: list[str], candidates: int, cold: bool = False
) -> tuple[list[list[SearchHit]], np.ndarray]:
    """One ``search`` call per caption, as a server answers queries: results and milliseconds.

    ``cold``: evict the regions from the page cache before each query (not timed).
    """
    index.search(captions[:1], top_k=10, candidates=candidates)  # warm-up: first-touch costs
    results, ms = [], []
    for caption in captions:
        if cold:
            evict_regions(index)
        start = time.perf_counter()
        results += index.search([caption], top_k=10, candidates=candidates)
        ms.append(1000 * (time.perf_counter() - start))
    return results, np.array(ms)


def report(
    index: GalleryIndex, k: int, cold: bool, found: list[list[SearchHit]], ms: np.ndarray,
    truth: list[list[SearchHit]], path: str | None = None,
) -> dict:
    """One result row (latency percentiles, recall@10 on the captions with ground truth), printed.

    ``path``: ``"app"`` or ``"qdrant"`` for those paths (module docstring), else the index's own.
    """
    kind = index.vector_kind if path is None else f"{index.vector_kind} ({path})"
    row = {"size": len(index), "first_stage": kind, "candidates": k, "cold": cold,
           "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
           "recall": recall_at_10(found[: len(truth)], truth)}
    print(f"  {kind}: K={k:>5}{' cold' if cold else '     '}: p50 {row['p50_ms']:7.1f} ms  "
          f"p95 {row['p95_ms']:7.1f} ms  recall@10 {row['recall']:.3f}", flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    """Latency (default first stage, warm and cold page cache) and recall@10 (both first stages)
    against gallery size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_latency, ax_recall) = plt.subplots(1, 2, figsize=(11, 4.4))
    colours = {k: f"C{i}" for i, k in enumerate(sorted({r["candidates"] for r in rows}))}
    for kind, k, cold in sorted({(r["first_stage"], r["candidates"], r["cold"]) for r in rows}):
        mine = sorted((r for r in rows if (r["first_stage"], r["candidates"], r["cold"]) == (kind, k, cold)),
                      key=lambda r: r["size"])
        stage, _, route = kind.partition(" (")
        sizes, colour = [r["size"] for r in mine], "black" if cold else PATH_COLOURS.get(route, colours[k])
        if stage != VECTOR_KINDS[0]:
            ax_recall.plot(sizes, [r["recall"] for r in mine], "o:", color=colour, label=f"{kind}, K={k}")
            continue
        label = f"K={k}" + (f", {route.rstrip(')')}" if route else "") + (", regions not in page cache" if cold else "")
        if not cold:
            ax_recall.plot(sizes, [r["recall"] for r in mine], "o-", color=colour, label=f"{kind}, K={k}")
        ax_latency.plot(sizes, [r["p50_ms"] for r in mine], "o-", color=colour, label=f"{label} p50")
        ax_latency.plot(sizes, [r["p95_ms"] for r in mine], "x--", color=colour, label=f"{label} p95")
    ax_latency.axhline(200, color="grey", lw=0.8, ls=":", label="200 ms target")
    ax_recall.axhline(0.95, color="grey", lw=0.8, ls=":", label="0.95 target")
    for ax, title, scale in ((ax_latency, f"query latency, {VECTOR_KINDS[0]} first stage (ms)", "log"),
                             (ax_recall, "recall@10 vs exhaustive ADAPT", "linear")):
        ax.set_xscale("log")
        ax.set_yscale(scale)
        ax.set_xlabel("gallery size (images)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.suptitle(f"two-stage ADAPT-T2I search, latent {LATENT}, {REGIONS} regions, "
                 f"{torch.get_num_threads()} thread(s), synthetic concept galleries", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--candidates", type=int, nargs="+", default=[50, 100, 200, 1000],
                        help="numbers of first-stage candidates K to measure")
    parser.add_argument("--queries", type=int, default=50, help="captions timed per size and K")
    parser.add_argument("--exhaustive-pairs", type=float, default=2e7,
                        help="bound on exhaustive (caption, image) pairs per size: fewer ground-truth "
                             "queries for large galleries (at least 10)")
    parser.add_argument("--baseline-max-size", type=int, default=100_000,
                        help="largest gallery for which the 'mean' first stage is measured too")
    parser.add_argument("--qdrant-max-size", type=int, default=10_000,
                        help="largest gallery measured with the embedded Qdrant first stage too")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and FAISS threads (default: theirs); on a shared machine 1 "
                             "avoids OpenMP threads waiting for each other")
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapt-search-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the generated gallery and model")
    parser.add_argument("--plot", type=Path, default=RESULTS / "search_scale.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    per_image = REGIONS * LATENT * 2 + REGIONS * 4 * 4 + 2 * LATENT * 4 + LATENT // 4 + 32
    images_on_disk = max(args.sizes) + min(max(args.sizes), args.baseline_max_size)
    print(f"benchmark size: latent {LATENT}, {REGIONS} regions of {REGION_DIM} input dims, float16 "
          f"regions: {per_image / 1024:.1f} KiB per image with boxes, first-stage vector and FAISS, "
          f"{per_image * max(args.sizes) / 2**30:.1f} GiB at {max(args.sizes):,} images")
    print(f"first stage per shard: FAISS exact below {ANN_MIN_ROWS:,} images, then PQ fast-scan with "
          f"exact refinement of {REFINE_FACTOR} x its hits; 'fovea-max' re-scores {POOL_FACTOR} x K hits "
          f"with the hard-fovea cosine; threads: torch {torch.get_num_threads()}, faiss "
          f"{faiss.omp_get_max_threads()}; timings are noisy when other work shares the cores")
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    if free < 1.1 * per_image * images_on_disk:
        sys.exit(f"{args.work} has {free / 2**30:.1f} GiB free, the galleries need "
                 f"{1.1 * per_image * images_on_disk / 2**30:.1f} GiB: pass --work on a larger disk or smaller --sizes")

    protos = concept_prototypes(N_CONCEPTS, REGION_DIM)
    model = load_or_train(args.work / "model", protos, args.train_steps, args.train_batch)
    captions = gallery_images(args.queries, 123_456, protos).captions
    indexes: dict[str, GalleryIndex | None] = {}
    for kind in (*VECTOR_KINDS, "qdrant"):
        shutil.rmtree(args.work / kind, ignore_errors=True)
    for kind in VECTOR_KINDS:
        indexes[kind] = GalleryIndex.create(args.work / kind, model, vector_kind=kind)
    qdrant = GalleryIndex.create(args.work / "qdrant", model,
                                 qdrant=QdrantFirstStage.connect("collection", "search-scale", args.work / "qdrant"))
    placeholder = placeholder_details(args.work)
    rows: list[dict] = []
    try:
        for size in sorted(args.sizes):
            kinds = [kind for kind in VECTOR_KINDS if kind == VECTOR_KINDS[0] or size <= args.baseline_max_size]
            build_s = {kind: grow(indexes[kind], size, protos, placeholder if kind == VECTOR_KINDS[0] else None)
                       for kind in kinds}
            if size <= args.qdrant_max_size:
                build_s["qdrant"] = grow(qdrant, size, protos)
            # Search with freshly opened indexes, as a serving process would: pages the builder
            # mapped would stay in the page cache whatever the cold run evicts.
            indexes.update({kind: None for kind in kinds})
            gc.collect()
            indexes.update({kind: GalleryIndex.open(args.work / kind, model) for kind in kinds})
            index = indexes[VECTOR_KINDS[0]]
            cold = timed_searches(index, captions, DEFAULT_CANDIDATES, cold=True)  # before anything reads
            n_truth = int(min(args.queries, max(10, args.exhaustive_pairs // size)))
            start = time.perf_counter()
            truth = index.search_exhaustive(captions[:n_truth], top_k=10)
            exhaustive_s = time.perf_counter() - start
            print(f"\n{size:,} images in {len(index.shards)} shard(s) of {index.shard_size:,}; built in "
                  + ", ".join(f"{s:.0f} s ({k})" for k, s in build_s.items())
                  + f"\n  exhaustive ADAPT top-10 of {n_truth} captions: {exhaustive_s:.1f} s "
                  f"({1000 * exhaustive_s / n_truth:.0f} ms per caption)")
            for kind in kinds:
                _, ms = timed_searches(indexes[kind], captions, 10)
                print(f"  {kind}: K=10 (about the first stage alone): p50 {np.percentile(ms, 50):.1f} ms")
                rows += [report(indexes[kind], k, False, *timed_searches(indexes[kind], captions, k), truth)
                         for k in args.candidates]
            rows.append(report(index, DEFAULT_CANDIDATES, True, *cold, truth))
            rows.append(report(index, DEFAULT_CANDIDATES, False,
                               *timed_app_searches(app_demo(model, index, args.work), captions), truth, path="app"))
            if size <= args.qdrant_max_size:
                rows.append(report(qdrant, DEFAULT_CANDIDATES, False,
                                   *timed_searches(qdrant, captions, DEFAULT_CANDIDATES), truth, path="qdrant"))
            plot(rows, args.plot)
    finally:
        qdrant.close()
        if args.keep:
            print(f"kept {args.work}")
        else:
            shutil.rmtree(args.work, ignore_errors=True)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
