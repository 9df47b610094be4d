"""Region-extraction speed and peak memory of the default backend on real photos.

    python benchmarks/extract_speed.py [--repeats 3] [--num-regions 36]

Twelve real photos (scikit-image and scikit-learn samples, 300x451 to 1411x1411) are written as JPEG
files, so decoding counts. Each configuration runs in its own process (its own peak RSS):

- ``detector only`` (baseline): decode + SSD-MobileNet-v2 in OpenCV, the floor any SSD-based
  extractor pays;
- ``extract, batch 1``: decode + detection + EfficientNet-Lite0 features for k regions, one image per call;
- ``extract, batch 8``: the same, eight images per call (as ``training.extract`` runs it).

The first pass over the photos is a warm-up and is not timed. Target: >= 5 images/s at k = 36 on 2 CPU
cores. Besides wall-clock images/s, the CPU time per image (user + system, all threads) is printed, and
the load average: other processes on the same cores slow the wall-clock numbers (and OpenMP threads
that wait for a busy core spin, inflating the CPU time too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {"detector": "detector only (baseline)", "batch1": "extract, batch 1", "batch8": "extract, batch 8"}


def write_photos(folder: Path) -> list[Path]:
    """The sample photos as JPEG files in ``folder``."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in (
        "astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
        "retina", "coins")}
    photos["motorcycle"] = data.stereo_motorcycle()[0]
    for filename, image in zip(("china", "flower"), load_sample_images().images, strict=True):
        photos[filename] = image
    paths = []
    for name, pixels in photos.items():
        paths.append(folder / f"{name}.jpg")
        Image.fromarray(np.asarray(pixels)).save(paths[-1], quality=90)
    return paths


def child(mode: str, folder: Path, repeats: int, num_regions: int) -> dict[str, float]:
    """Time one configuration in this process; returns images/s and peak RSS."""
    import torch

    from adapt.regions import SsdEfficientNetExtractor, load_image

    extractor = SsdEfficientNetExtractor(num_regions=num_regions)
    paths = sorted(folder.glob("*.jpg"))

    def one_pass() -> None:
        if mode == "detector":
            with torch.inference_mode():
                for path in paths:
                    extractor._run_detector(load_image(path))
        else:
            extractor.extract_batch(paths, batch_size=1 if mode == "batch1" else 8)

    one_pass()
    cpu_start, start = cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        one_pass()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    n_images = repeats * len(paths)
    return {"images_per_s": n_images / seconds, "cpu_ms_per_image": 1000 * cpu / n_images,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the photos")
    parser.add_argument("--num-regions", type=int, default=36)
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.repeats, args.num_regions)))
        return

    # Run the extractor as training.extract does (see there: OpenMP threads sleep instead of spinning).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp))
        print(f"{len(paths)} photos, k = {args.num_regions}, {args.repeats} timed passes, {os.cpu_count()} CPUs, "
              f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average before: {os.getloadavg()[0]:.2f}")
        print(f"{'configuration':<28} {'images/s':>9} {'ms/image':>9} {'CPU ms/image':>13} {'peak RSS':>10}")
        for mode, title in MODES.items():
            output = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--folder", tmp, "--repeats", str(args.repeats),
                 "--num-regions", str(args.num_regions)],
                check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            print(f"{title:<28} {result['images_per_s']:>9.2f} {1000 / result['images_per_s']:>9.0f} "
                  f"{result['cpu_ms_per_image']:>13.0f} {result['peak_rss_mb']:>7.0f} MB")
        print(f"torch threads {result['torch_threads']}; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
