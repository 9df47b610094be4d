"""Speed and memory of full ADAPT scoring against a per-caption loop, measured in the same run.

The baseline mirrors the reference implementation (retrieval/model/similarity/similarity.py): one
Python iteration per caption (T2I) or per image (I2T), each adapting the whole other side. It is
timed on a slice and scaled linearly to the full size (the output says so). Each measurement runs in
its own subprocess so that its peak RSS is its own.

    python benchmarks/score_speed.py                      # 1000 images x 5000 captions, both directions
    python benchmarks/score_speed.py --captions 500 --direction t2i
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapt.similarity import ImageToText, TextToImage  # noqa: E402

LATENT, REGIONS, TOKENS = 1024, 36, 12


def inputs(n_images: int, n_captions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    regions = F.normalize(torch.randn(n_images, REGIONS, LATENT, generator=g), dim=-1)
    words = F.normalize(torch.randn(n_captions, TOKENS, LATENT, generator=g), dim=-1)
    lengths = torch.randint(6, TOKENS + 1, (n_captions,), generator=g)
    mask = torch.arange(TOKENS)[None] < lengths[:, None]
    return regions, words * mask[..., None], mask


def head(direction: str) -> torch.nn.Module:
    torch.manual_seed(0)
    module = TextToImage(LATENT, 10.0, "batchnorm") if direction == "t2i" else ImageToText(
        LATENT, 10.0, "batchnorm")
    return module.eval()


def loop_t2i(module: TextToImage, regions, words, mask) -> torch.Tensor:
    """The reference's shape: BatchNorm once, then per caption FiLM + fovea + mean + cosine."""
    images = module.norm(regions.transpose(1, 2))  # (n_images, d, r), as the reference lays it out
    scores = torch.zeros(len(regions), len(words))
    for c in range(len(words)):
        q = words[c, mask[c]].mean(0, keepdim=True)
        gamma, beta = module.adapt.fc_gamma(q), module.adapt.fc_beta(q)
        adapted = images * (gamma[..., None] + 1) + beta[..., None]
        adapted = adapted * torch.softmax(adapted * module.fovea.smooth, dim=-1)
        pooled = F.normalize(adapted.mean(-1), dim=-1)
        scores[:, c] = pooled @ F.normalize(q, dim=-1)[0]
    return scores


def loop_i2t(module: ImageToText, regions, words, mask) -> torch.Tensor:
    """Per image: FiLM of every caption's words + fovea + max + cosine (padding masked)."""
    normed = torch.zeros_like(words).index_put((mask,), module.norm(words[mask]))
    scores = torch.zeros(len(regions), len(words))
    for i in range(len(regions)):
        q = regions[i].mean(0, keepdim=True)
        gamma, beta = module.adapt.fc_gamma(q), module.adapt.fc_beta(q)
        adapted = normed * (gamma[:, None] + 1) + beta[:, None]
        logits = (adapted * module.fovea.smooth).masked_fill(~mask[..., None], float("-inf"))
        out = (adapted * torch.softmax(logits, dim=1)).masked_fill(~mask[..., None], float("-inf"))
        pooled = F.normalize(out.amax(1), dim=-1)
        scores[i] = pooled @ F.normalize(q, dim=-1)[0]
    return scores


def measure(method: str, direction: str, n_images: int, n_captions: int, budget: float) -> dict:
    """Run one method once and return seconds, peak RSS and a checksum row for comparison."""
    torch.set_num_threads(torch.get_num_threads())
    regions, words, mask = inputs(n_images, n_captions)
    module = head(direction)
    with torch.inference_mode():
        start = time.perf_counter()
        if method == "loop":
            scores = (loop_t2i if direction == "t2i" else loop_i2t)(module, regions, words, mask)
        else:
            scores = module(regions, words, mask, memory_budget_mb=budget)[0]
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first": scores[:, :8].tolist()}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--direction", choices=["t2i", "i2t", "both"], default="both")
    parser.add_argument("--baseline-slice", type=int, default=25,
                        help="captions (T2I) or images (I2T) the loop is timed on, then scaled")
    parser.add_argument("--budget-mb", type=float, default=256.0)
    parser.add_argument("--child", nargs=5, metavar=("METHOD", "DIR", "IMAGES", "CAPTIONS", "BUDGET"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, direction, n_images, n_captions, budget = args.child
        print(json.dumps(measure(method, direction, int(n_images), int(n_captions), float(budget))))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, latent {LATENT}, "
          f"{REGIONS} regions, {TOKENS}-token captions, memory budget {args.budget_mb} MB")
    for direction in (["t2i", "i2t"] if args.direction == "both" else [args.direction]):
        pairs = args.images * args.captions
        if direction == "t2i":
            loop_shape, loop_fraction = (args.images, args.baseline_slice), args.baseline_slice / args.captions
        else:
            loop_shape, loop_fraction = (args.baseline_slice, args.captions), args.baseline_slice / args.images
        loop = run_child("loop", direction, *map(str, loop_shape), str(args.budget_mb))
        ours = run_child("batched", direction, str(args.images), str(args.captions), str(args.budget_mb))
        loop_full = loop["seconds"] / loop_fraction
        same = torch.allclose(torch.tensor(loop["first"])[:, :8] if direction == "t2i" else torch.tensor(loop["first"]),
                              torch.tensor(ours["first"])[: len(loop["first"]), : len(loop["first"][0])], atol=1e-4)
        print(f"\n[{direction}] {args.images} images x {args.captions} captions = {pairs:,} pairs")
        print(f"  per-{'caption' if direction == 't2i' else 'image'} loop: {loop['seconds']:.2f} s on "
              f"{loop_shape[0]} x {loop_shape[1]}, scaled linearly to the full size: {loop_full:.1f} s "
              f"({pairs / loop_full:,.0f} pairs/s), peak RSS {loop['peak_rss_mb']:.0f} MB")
        print(f"  adapt batched:  {ours['seconds']:.1f} s ({pairs / ours['seconds']:,.0f} pairs/s), "
              f"peak RSS {ours['peak_rss_mb']:.0f} MB")
        print(f"  speed-up: {loop_full / ours['seconds']:.2f}x   scores agree with the loop: {same}")


if __name__ == "__main__":
    main()
