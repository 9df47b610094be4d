"""Speed and memory of full ADAPT scoring against a per-caption loop, measured in the same run.

Three implementations of the same scores:
- loop: the baseline, mirroring the reference implementation (retrieval/model/similarity/
  similarity.py): one Python iteration per caption (T2I) or per image (I2T), each adapting the whole
  other side. Timed on a slice and scaled linearly to the full size (the output says so).
- plain: adapt's batched PyTorch path (cache-sized blocks; ADAPT_FUSED=0).
- fused: adapt's fused C++ kernels (adapt/fused.py), the default on CPU.
It also measures the machine's exp throughput (vectorised expf on cache-resident data, all threads) and
prints the floor it implies: every pair needs n_locals x d exponentials. Each measurement runs in
its own subprocess so that its peak RSS is its own.

    python -m benchmarks.score_speed                      # 1000 images x 5000 captions, both directions
    python -m benchmarks.score_speed --captions 500 --direction t2i
    python -m benchmarks.score_speed --device cuda        # adds the PyTorch path on the GPU, checked
                                                          # against the CPU loop's scores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adapt.similarity import ImageToText, TextToImage

LATENT, REGIONS, TOKENS = 1024, 36, 12
ROOT = Path(__file__).resolve().parents[1]  # where the children run, as python -m benchmarks.score_speed


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
    # (n_images, d, r), laid out as the reference does
    images = module.prepare_images(regions).transpose(1, 2).contiguous()
    captions = module.prepare_queries(words, mask)
    scores = torch.zeros(len(regions), len(words))
    for c in range(len(words)):
        adapted = images * captions.scale[c, :, None] + captions.shift[c, :, None]
        adapted = adapted * torch.softmax(adapted * module.fovea.smooth, dim=-1)
        pooled = F.normalize(adapted.mean(-1), dim=-1)
        scores[:, c] = pooled @ captions.query_unit[c]
    return scores


def loop_i2t(module: ImageToText, regions, words, mask) -> torch.Tensor:
    """Per image: FiLM of every caption's words + fovea + max + cosine (padding masked)."""
    normed, _ = module.prepare_captions(words, mask)
    images = module.prepare_queries(regions)
    scores = torch.zeros(len(regions), len(words))
    for i in range(len(regions)):
        adapted = normed * images.scale[i] + images.shift[i]
        logits = (adapted * module.fovea.smooth).masked_fill(~mask[..., None], float("-inf"))
        out = (adapted * torch.softmax(logits, dim=1)).masked_fill(~mask[..., None], float("-inf"))
        pooled = F.normalize(out.amax(1), dim=-1)
        scores[i] = pooled @ images.query_unit[i]
    return scores


EXP_FLOOR_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
// Sum of exp over a cache-resident buffer, repeated: the best case for the exponentials alone,
// compiled with the same flags as adapt's fused kernels.
double exp_sum(torch::Tensor x, int64_t repeats) {
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  std::vector<double> partial(at::get_num_threads(), 0.0);
  at::parallel_for(0, repeats, 1, [&](int64_t r0, int64_t r1) {
    float acc = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < n; ++i) acc += std::exp(p[i] * 0.5f);
    }
    partial[at::get_thread_num()] += acc;
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}
"""


def exp_rate(seconds: float = 2.0) -> float:
    """Exponentials per second, vectorised and on all threads, on cache-resident float32 data."""
    from torch.utils.cpp_extension import load_inline

    module = load_inline("adapt_exp_floor", EXP_FLOOR_SOURCE, functions=["exp_sum"],
                         extra_cflags=["-O3", "-march=native", "-ffast-math"])
    x = torch.rand(2**14) - 0.5
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        module.exp_sum(x, 1000)
        count += 1000 * x.numel()
    return count / (time.perf_counter() - start)


def measure(method: str, direction: str, n_images: int, n_captions: int, budget: float,
            part: int, device: str = "cpu") -> dict:
    """Run one method once and return seconds, peak RSS and a checksum row for comparison.

    ``part`` > 0 times the method on that many captions (T2I) or images (I2T) of the same inputs.
    """
    if method == "exp":
        return {"rate": exp_rate()}
    regions, words, mask = inputs(n_images, n_captions)
    if part:
        regions, words, mask = (regions, words[:part], mask[:part]) if direction == "t2i" \
            else (regions[:part], words, mask)
    module = head(direction).to(device)
    regions, words, mask = regions.to(device), words.to(device), mask.to(device)
    with torch.inference_mode():
        start = time.perf_counter()
        if method == "loop":
            scores = (loop_t2i if direction == "t2i" else loop_i2t)(module, regions, words, mask)
        else:  # plain or fused: ADAPT_FUSED is set by the parent
            scores = module(regions, words, mask, memory_budget_mb=budget)[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        scores = scores.cpu()
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first": scores[:, :8].tolist()}


def run_child(*args: str) -> dict:
    env = {**os.environ, "ADAPT_FUSED": "0" if args[0] == "plain" else "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.score_speed", "--child", *args], cwd=ROOT,
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--direction", choices=["t2i", "i2t", "both"], default="both")
    parser.add_argument("--baseline-slice", type=int, default=25,
                        help="captions (T2I) or images (I2T) the loop is timed on, then scaled")
    parser.add_argument("--plain-slice", type=int, default=250,
                        help="the same for the plain PyTorch path (0: the full size)")
    parser.add_argument("--budget-mb", type=float, default=256.0)
    parser.add_argument("--device", default="cpu",
                        help="cuda: also time adapt's PyTorch path on the GPU and check it against the CPU")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, direction, n_images, n_captions, budget, part, device = args.child
        print(json.dumps(measure(method, direction, int(n_images), int(n_captions), float(budget),
                                 int(part), device)))
        return

    from adapt import fused

    fused.kernels()  # build outside the timed children
    rate = run_child("exp", "t2i", "0", "0", "0", "0", "cpu")["rate"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, latent {LATENT}, "
          f"{REGIONS} regions, {TOKENS}-token captions, memory budget {args.budget_mb} MB")
    print(f"exp throughput: {rate / 1e9:.2f} G exp/s (vectorised expf, cache-resident, all threads)")
    for direction in (["t2i", "i2t"] if args.direction == "both" else [args.direction]):
        pairs = args.images * args.captions
        floor = pairs * (REGIONS if direction == "t2i" else TOKENS) * LATENT / rate
        print(f"\n[{direction}] {args.images} images x {args.captions} captions = {pairs:,} pairs; exp floor "
              f"{floor:.1f} s; times of sliced runs are scaled linearly to the full size")
        sliced = args.captions if direction == "t2i" else args.images
        results = {}
        runs = [("loop", args.baseline_slice, "cpu"), ("plain", args.plain_slice, "cpu"), ("fused", 0, "cpu")]
        if args.device != "cpu":
            runs.append(("plain", 0, args.device))
        for method, part, device in runs:
            part = min(part, sliced)
            got = run_child(method, direction, str(args.images), str(args.captions), str(args.budget_mb), str(part),
                            device)
            method = method if device == "cpu" else device
            results[method] = seconds = got["seconds"] * (sliced / part if part else 1.0)
            expected = torch.tensor(results.setdefault("first", got["first"]))
            rows, cols = min(len(expected), len(got["first"])), min(expected.shape[1], len(got["first"][0]))
            agree = torch.allclose(expected[:rows, :cols], torch.tensor(got["first"])[:rows, :cols], atol=1e-4)
            timed = f"timed on {part} {'captions' if direction == 't2i' else 'images'}" if part else "full size"
            print(f"  {method:6s} {seconds:8.1f} s ({timed:>20s})  {results['loop'] / seconds:6.1f}x the loop  "
                  f"{seconds / floor:6.1f}x the exp floor  {pairs / seconds:11,.0f} pairs/s  "
                  f"peak RSS {got['peak_rss_mb']:6.0f} MB  agrees with the loop: {agree}")


if __name__ == "__main__":
    main()
