"""Speed and peak memory of one T2I training step of the similarity head: fused kernels vs plain.

The step starts from encoded features, so it measures the similarity and nothing else (the encoders
and the optimiser are in ``benchmarks/train_speed.py``): regions ``(128, 36, 1024)`` and word
features ``(128, 12, 1024)`` that require grad, the ``TextToImage`` head in training mode (BatchNorm
on batch statistics), the hinge loss of the 128 x 128 scores, backward. Three implementations of
the same step:

- loop: reference-shaped (``loop_t2i`` of ``benchmarks/score_speed.py``): BatchNorm once, then per
  caption FiLM + fovea + mean + cosine over all images, autograd through all of it. It keeps every
  caption's adapted tensors for the backward: more than 20 GB at batch 128, so by default it runs
  at batch 64 and its time is scaled by the number of pairs (the output says so).
- plain: adapt's batched PyTorch path, checkpointed cache-sized blocks (``ADAPT_FUSED=0``).
- fused: adapt's fused C++ kernels, forward and backward (:class:`adapt.fused.T2IScores`).

Each runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own.

    python benchmarks/fused_train_step.py                # 1 warm-up + 3 timed steps each
    python benchmarks/fused_train_step.py --threads 1 --steps 5 --loop-batch 32
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapt import HingeLoss  # noqa: E402
from adapt.similarity import DEFAULT_MEMORY_BUDGET_MB  # noqa: E402
from score_speed import LATENT, REGIONS, TOKENS, head, inputs, loop_t2i  # noqa: E402

METHODS = ("loop", "plain", "fused")


def measure(method: str, batch: int, steps: int, budget: float) -> dict:
    """Time ``steps`` training steps after one warm-up; also report the loss and peak RSS."""
    regions, words, mask = inputs(batch, batch)
    regions.requires_grad_()
    words.requires_grad_()
    module = head("t2i").train()
    loss_fn = HingeLoss()
    times, losses = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        if method == "loop":
            scores = loop_t2i(module, regions, words, mask)
        else:  # plain or fused: ADAPT_FUSED is set by the parent
            scores = module(regions, words, mask, memory_budget_mb=budget)[0]
        scores.retain_grad()
        loss = loss_fn(scores)
        module.zero_grad(set_to_none=True)
        regions.grad = words.grad = None
        loss.backward()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"seconds": sum(times[1:]) / steps, "losses": losses,
            "pairs_with_gradient": (scores.grad != 0).double().mean().item(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(method: str, batch: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "ADAPT_FUSED": "0" if method == "plain" else "1"}
    command = [sys.executable, __file__, "--child", method, "--batch", str(batch), "--steps",
               str(args.steps), "--budget-mb", str(args.budget_mb), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--loop-batch", type=int, default=64,
                        help="batch the loop runs at; its time is scaled to --batch by pairs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up")
    parser.add_argument("--budget-mb", type=float, default=DEFAULT_MEMORY_BUDGET_MB,
                        help="the plain path's memory budget for pair tensors")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.steps, args.budget_mb)))
        return

    from adapt import fused

    if fused.kernels() is None:  # built here, outside the timed children
        sys.exit("the fused kernels are unavailable (ADAPT_FUSED=0 or no compiler)")
    print(f"torch {torch.__version__}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}; T2I head training step: batch {args.batch}, latent {LATENT}, "
          f"{REGIONS} regions, {TOKENS}-token captions, hinge loss, forward + backward; "
          f"mean of {args.steps} steps after 1 warm-up")
    results = {method: run_child(method, args.loop_batch if method == "loop" else args.batch, args)
               for method in METHODS}
    loop_pairs = (args.batch / args.loop_batch) ** 2
    results["loop"]["seconds"] *= loop_pairs
    for method, r in results.items():
        note = (f"  (ran at batch {args.loop_batch}: time x{loop_pairs:g} for the pairs; RSS and "
                f"loss at batch {args.loop_batch})" if method == "loop" and loop_pairs != 1 else "")
        print(f"  {method:6s} {r['seconds']:7.3f} s/step  peak RSS {r['peak_rss_mb']:6.0f} MB  "
              f"first loss {r['losses'][0]:10.4f}  pairs with gradient "
              f"{100 * r['pairs_with_gradient']:3.0f}%{note}")
    compared = [m for m in METHODS if m != "loop" or loop_pairs == 1]
    first = results["fused"]["losses"][0]
    agree = all(abs(results[m]["losses"][0] - first) <= 1e-4 * abs(first) for m in compared)
    fused_s = results["fused"]["seconds"]
    print(f"  fused: {results['plain']['seconds'] / fused_s:.1f}x faster than plain, "
          f"{results['loop']['seconds'] / fused_s:.1f}x faster than the loop; first losses of "
          f"{', '.join(compared)} agree: {agree}")


if __name__ == "__main__":
    main()
