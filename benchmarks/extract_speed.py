"""Region-extraction speed and peak memory on real photos: the default backend and bottom-up attention.

    python -m benchmarks.extract_speed [--repeats 3] [--num-regions 36] [--backend ssd|bottom-up|both]
        [--photos N] [--small]                                             # from the repository root

Twelve real photos (scikit-image and scikit-learn samples, 300x451 to 1411x1411) are written as JPEG
files, so decoding counts. Each configuration runs in its own process (its own peak RSS):

- ``detector only`` (baseline): decode + SSD-MobileNet-v2 in OpenCV, the floor any SSD-based
  extractor pays;
- ``extract, batch 1``: decode + detection + EfficientNet-Lite0 features for k regions, one image per call;
- ``extract, batch 8``: the same, eight images per call (as ``training.extract`` runs it);
- ``bottom-up: backbone`` (its baseline): Caffe pre-processing + ResNet-101 up to res4 at the published
  600 / 1000-px input, the floor of any ResNet-101 C4 detector;
- ``bottom-up: extract``: the whole bottom-up-attention extractor at its published settings (300 RPN
  proposals, each through res5; per-class NMS; k boxes). Its weights are random (the published
  ones are not available offline; the cost does not depend on the values), written to a temporary file.

- ``bottom-up: per stage``: one 600 x 1000 photo through each stage (input, backbone, RPN, box
  head, predictor, per-class NMS), the median of ``--repeats`` passes; the per-class NMS both as
  adapt runs it (all classes at once) and as it ran before (one torchvision ``nms`` call per class,
  :func:`nms_per_class_loop`, kept here only as the baseline), the same photo in the same process.

``--small`` (3 photos, 1 timed pass) is a quick check; bottom-up attention costs seconds per image on CPU.

The first pass over the photos is a warm-up and is not timed. Target (default backend): >= 5 images/s at k = 36 on 2 CPU
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

MODES = {"detector": "detector only (baseline)", "batch1": "extract, batch 1", "batch8": "extract, batch 8",
         "bua-backbone": "bottom-up: backbone (baseline)", "bua-extract": "bottom-up: extract",
         "bua-stages": "bottom-up: per stage"}
BACKENDS = {"ssd": ("detector", "batch1", "batch8"), "bottom-up": ("bua-backbone", "bua-extract", "bua-stages")}


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


def write_random_bottom_up_weights(path: Path) -> Path:
    """Random weights in the published bottom-up-attention layout (the real ones cost the same)."""
    import torch

    from adapt.regions.bottom_up_net import BottomUpAttentionNet

    torch.save(BottomUpAttentionNet().state_dict(), path)
    return path


def nms_per_class_loop(boxes, class_probs, nms_iou: float):
    """The per-class confidence as adapt computed it before: one ``torchvision.ops.nms`` per class.

    Args and result as :func:`adapt.regions.bottom_up.per_class_confidence` (``(R, 4)``, ``(R, C)`` -> ``(R,)``).
    """
    import torch
    from torchvision.ops import nms

    confidence = torch.zeros(len(boxes), device=boxes.device)
    for scores in class_probs.t():
        kept = nms(boxes, scores, nms_iou)
        confidence[kept] = torch.maximum(confidence[kept], scores[kept])
    return confidence


def stages(extractor, path: Path, repeats: int) -> dict[str, float]:
    """Median seconds of each bottom-up stage on one photo resized to 1000 x 600 (a 600 x 1000 input)."""
    import torch

    from adapt.regions import load_image
    from adapt.regions.bottom_up import NUM_CLASSES, caffe_input, per_class_confidence

    photo = load_image(path).resize((extractor.max_side, extractor.short_side))
    model, times = extractor.model, {}

    def clock(name: str, run):
        start = time.perf_counter()
        result = run()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return result

    with torch.inference_mode():
        for _ in range(repeats):
            x = clock("input", lambda: caffe_input(photo, extractor.short_side, extractor.max_side, extractor.device))
            res4 = clock("backbone", lambda: model.backbone(x))
            proposals = clock("rpn", lambda: model.proposal_generator(res4, tuple(x.shape[-2:]), extractor.num_proposals))
            features = clock("box head", lambda: model.roi_heads.pool(res4, proposals))
            logits = clock("predictor", lambda: model.roi_heads.box_predictor(features)[0])
            probs = logits.softmax(dim=1)[:, :NUM_CLASSES]
            new = clock("nms, all classes", lambda: per_class_confidence(proposals, probs, extractor.nms_iou))
            old = clock("nms, loop (before)", lambda: nms_per_class_loop(proposals, probs, extractor.nms_iou))
            if not torch.equal(new, old):
                raise AssertionError("the per-class NMS differs from the loop's")
    return {name: float(np.median(values)) for name, values in times.items()}


def child(mode: str, folder: Path, repeats: int, num_regions: int, photos: int) -> dict[str, float]:
    """Time one configuration in this process; returns images/s and peak RSS."""
    import torch

    from adapt.regions import BottomUpAttentionExtractor, SsdEfficientNetExtractor, load_image
    from adapt.regions.bottom_up import caffe_input

    if mode.startswith("bua"):
        extractor = BottomUpAttentionExtractor(folder / "bottom_up.bin", num_regions=num_regions)
    else:
        extractor = SsdEfficientNetExtractor(num_regions=num_regions)
    paths = sorted(folder.glob("*.jpg"))[:photos]
    if mode == "bua-stages":
        return stages(extractor, folder / "astronaut.jpg", repeats)

    def one_pass() -> None:
        if mode == "detector":
            with torch.inference_mode():
                for path in paths:
                    extractor._run_detector(load_image(path))
        elif mode == "bua-backbone":
            with torch.inference_mode():
                for path in paths:
                    extractor.model.backbone(caffe_input(load_image(path), extractor.short_side, extractor.max_side,
                                                         extractor.device))
        else:
            extractor.extract_batch(paths, batch_size=8 if mode == "batch8" else 1)

    one_pass()
    cpu_start, start = cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        one_pass()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    n_images = repeats * len(paths)
    return {"images_per_s": n_images / seconds, "cpu_ms_per_image": 1000 * cpu / n_images,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def print_stages(seconds: dict[str, float]) -> None:
    """Each stage's median seconds, the whole before and after, and their ratio."""
    after = sum(v for k, v in seconds.items() if k != "nms, loop (before)")
    before = after - seconds["nms, all classes"] + seconds["nms, loop (before)"]
    print("bottom-up, one 600 x 1000 photo, median seconds per stage:")
    for name, value in seconds.items():
        print(f"  {name:<26} {value:>9.3f}")
    print(f"  {'whole, before':<26} {before:>9.3f}\n  {'whole, after':<26} {after:>9.3f}\n"
          f"  {'before / after':<26} {before / after:>9.3f}  (per-class NMS alone: "
          f"{seconds['nms, loop (before)'] / seconds['nms, all classes']:.1f}x)")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the photos")
    parser.add_argument("--num-regions", type=int, default=36)
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    parser.add_argument("--photos", type=int, default=12, help="how many of the 12 photos to use")
    parser.add_argument("--small", action="store_true", help="quick run: 3 photos, 1 timed pass")
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.photos, args.repeats = 3, 1
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.repeats, args.num_regions, args.photos)))
        return

    # Run the extractor as training.extract does (see there: OpenMP threads sleep instead of spinning).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp))[:args.photos]
        modes = [mode for backend, names in BACKENDS.items() if args.backend in (backend, "both") for mode in names]
        if any(mode.startswith("bua") for mode in modes):
            write_random_bottom_up_weights(Path(tmp) / "bottom_up.bin")
        print(f"{len(paths)} photos, k = {args.num_regions}, {args.repeats} timed passes, {os.cpu_count()} CPUs, "
              f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average before: {os.getloadavg()[0]:.2f}")
        print(f"{'configuration':<28} {'images/s':>9} {'ms/image':>9} {'CPU ms/image':>13} {'peak RSS':>10}")
        for mode in modes:
            title = MODES[mode]
            output = subprocess.run(
                [sys.executable, "-m", "benchmarks.extract_speed", "--child", mode, "--folder", tmp, "--repeats", str(args.repeats),
                 "--num-regions", str(args.num_regions), "--photos", str(args.photos)],
                check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            if mode == "bua-stages":
                print_stages(result)
                continue
            print(f"{title:<28} {result['images_per_s']:>9.2f} {1000 / result['images_per_s']:>9.0f} "
                  f"{result['cpu_ms_per_image']:>13.0f} {result['peak_rss_mb']:>7.0f} MB")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
