"""App latency on the bundled default model: upload -> ranked captions, and a gallery query.

1. Rank: the real app is launched and driven through gradio_client: upload a photo and rank 10
   captions, end to end (HTTP upload, region extraction, scoring, drawing). Every request uses a
   new photo (a random crop of a sample photo) so the region cache never helps.
2. Search: the app's own search action over a gallery of 1,000 images (the regions of the sample
   photos, repeated with small feature noise so no two are alike), from caption to drawn results.

    python -m benchmarks.app_latency [--runs 20] [--gallery 1000]     # from the repository root

Targets on 2 CPU cores: rank p50 < 1.5 s, search p50 < 0.5 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import app
import app_logic
from adapt.gallery import MemoryGallery
from adapt.pipeline import Retriever
from checkpoints import DEFAULT_CHECKPOINT

CAPTIONS = "\n".join([
    "a mug", "a red apple", "an orange", "a butterfly", "a soccer ball", "a sliced lime",
    "a basketball", "two pumpkins", "a duck to the left of a red bus", "a large white dog",
])


def percentiles(seconds: list[float]) -> str:
    p50, p95 = np.percentile(seconds, [50, 95])
    return f"p50 {p50:.3f} s  p95 {p95:.3f} s  (n = {len(seconds)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--gallery", type=int, default=1000)
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GRADIO_TEMP_DIR"] = tmp  # uploads and drawings go where the run deletes them
        retriever = Retriever.from_pretrained(DEFAULT_CHECKPOINT, cache_dir=Path(tmp) / "cache")
        demo = app.build_demo(app.Demo(retriever), str(DEFAULT_CHECKPOINT))
        demo.queue(default_concurrency_limit=2)
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
        client = Client(url, verbose=False, download_files=tmp)
        logic = app.Demo(retriever, app_logic.DrawingFiles(Path(tmp) / "drawings"))
        scoring = logic.choices[0]
        photos = [Image.open(p).convert("RGB") for p in app.EXAMPLES]
        rank_times = []
        for i in range(args.runs + 1):
            photo = photos[i % len(photos)]
            w, h = photo.size
            x, y = rng.integers(0, w // 5), rng.integers(0, h // 5)
            path = Path(tmp) / f"upload{i}.jpg"
            photo.crop((x, y, x + 4 * w // 5, y + 4 * h // 5)).save(path, quality=90)
            start = time.perf_counter()
            client.predict(handle_file(str(path)), CAPTIONS, scoring, False, api_name="/rank_captions")
            if i:  # the first request warms the server up
                rank_times.append(time.perf_counter() - start)
        demo.close()

        base = logic.start_state["gallery"]
        gallery = MemoryGallery(base.model)
        for i in range(args.gallery):
            key, regions, source = (values[i % len(base)] for values in (base.keys, base.regions, base.sources))
            noisy = regions.features + rng.normal(0, 0.01, regions.features.shape).astype(np.float32)
            gallery.add(f"{key}-{i}", dataclasses.replace(regions, features=noisy), source=source)
        state = {**logic.empty_state(), "gallery": gallery}
        logic.search("a mug", 8, state)  # encodes the gallery once, as the app does on first query
        search_times = []
        for query in (CAPTIONS.splitlines() * 3)[: args.runs]:
            start = time.perf_counter()
            logic.search(query, 8, state)
            search_times.append(time.perf_counter() - start)

    print(f"rank 10 captions, upload to ranked (gradio_client, new photo each time): {percentiles(rank_times)}")
    print(f"search {args.gallery} images, caption to 8 drawn results (app's search action): "
          f"{percentiles(search_times)}")
    print(f"targets: rank p50 < 1.5 s -> {np.median(rank_times) < 1.5}; "
          f"search p50 < 0.5 s -> {np.median(search_times) < 0.5}")


if __name__ == "__main__":
    main()
