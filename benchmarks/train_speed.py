"""Speed and peak memory of one full ADAPT training step, T2I and I2T, against a reference-shaped loop.

One step at the paper's size: batch 128, latent 1024, 36 regions of 2048-d features, 12-token
captions; region and text encoders, the similarity of the 128 x 128 batch, hinge loss, backward,
gradient clipping and an Adamax step. The methods share the model, the weights and the inputs
(fixed seeds), so their first losses agree:

- loop: the reference's shape (``retrieval/model/similarity/similarity.py``): the same encoders,
  then one Python iteration per caption (T2I) or per image (I2T), each adapting the whole other
  side (``loop_t2i`` / ``loop_i2t`` of :mod:`benchmarks.score_speed`), autograd through all of it;
- plain: adapt's batched PyTorch path (checkpointed blocks; ``ADAPT_FUSED=0``);
- fused: adapt's fused C++ kernels, forward and backward (the default on CPU).

The encoders (the BiGRU above all) cost the same in every method, so they bound the step's
speed-up: about 2.8 of the step's CPU seconds here, matrix products near this CPU's peak (the
region layer's 39 GFLOP and the BiGRU's 86, forward and backward), so even a free similarity head
would leave T2I about 5.5x and I2T about 4x faster than the loop. The captions all have 12
tokens, so every method runs the GRU unpacked over the batch, as the reference does
(``GRUTextEncoder`` packs only batches with padding). ``--head-only`` times the similarity head
alone, as the step sees it: encoded regions ``(b, 36, 1024)`` and words ``(b, 12, 1024)`` that
require grad, the head in training mode (BatchNorm on batch statistics), the hinge loss, backward.

``--processes N`` adds the fused step under DDP (:mod:`training.distributed`, gloo): N processes,
each with ``threads / N`` threads and a shard of the same global batch, against one process with
all the threads. Each measurement runs in its own subprocess so that its peak RSS (``ru_maxrss``,
summed over the processes of a DDP run) is its own. Wall and CPU time (``process_time``) are both
printed: on a shared machine the CPU time is the steadier. The children run with
``OMP_WAIT_POLICY=PASSIVE`` unless it is set: OpenMP threads that spin while waiting make the GRU
about 4x slower when the cores are shared, in every method alike.

    python -m benchmarks.train_speed                     # paper size, loop vs fused, both heads
    python -m benchmarks.train_speed --quick             # batch 32, 1 timed step: a smoke test
    python -m benchmarks.train_speed --methods loop plain fused --heads t2i --steps 5 --head-only
    python -m benchmarks.train_speed --methods fused --processes 2
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
import torch

from adapt import AdaptConfig, AdaptModel, HingeLoss, TokenBatch
from adapt.similarity import DEFAULT_MEMORY_BUDGET_MB
from benchmarks.score_speed import LATENT, REGIONS, TOKENS, inputs, loop_i2t, loop_t2i
from benchmarks.score_speed import head as similarity_head

BATCH, REGION_DIM, VOCAB = 128, 2048, 5000
ROOT = Path(__file__).resolve().parents[1]  # where the children run, as python -m benchmarks.train_speed
METHODS = ("loop", "plain", "fused")


def setup(head: str, batch: int) -> tuple[AdaptModel, torch.Tensor, TokenBatch]:
    """The same model (``head`` = ``"t2i"`` or ``"i2t"``) and inputs for every method (fixed seeds):
    features ``(batch, 36, 2048)`` and ``batch`` captions of 12 random words."""
    torch.manual_seed(0)
    vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(VOCAB)]
    model = AdaptModel(AdaptConfig(region_dim=REGION_DIM, latent_size=LATENT, similarity=head, vocab=vocab,
                                   word_vectors="random", word_dim=300)).train()
    g = torch.Generator().manual_seed(1)
    features = torch.randn(batch, REGIONS, REGION_DIM, generator=g)
    words = torch.randint(2, len(vocab), (batch, TOKENS), generator=g)
    tokens = model.tokenize([" ".join(vocab[i] for i in row) for row in words.tolist()])
    return model, features, tokens


def loop_scores(model: AdaptModel, head: str, features: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
    """Reference-shaped scores ``(n_images, n_captions)``: adapt's encoders, then the loop."""
    regions = model.encode_regions(features)
    words, mask = model.encode_text(tokens)
    loop = loop_t2i if head == "t2i" else loop_i2t
    return loop(model.similarity.heads[head], regions, words, mask)


def time_steps(step, steps: int) -> dict:
    """Run ``step() -> loss`` once to warm up, then ``steps`` times; mean wall / CPU seconds."""
    times, cpu_times, losses = [], [], []
    for _ in range(steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"seconds": sum(times[1:]) / steps, "cpu_seconds": sum(cpu_times[1:]) / steps,
            "warmup_seconds": times[0], "losses": losses,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def training_step(scores, params: list[torch.Tensor], optimize: bool):
    """A function that computes ``scores()``, the hinge loss and its gradients in ``params`` (then
    clips them and takes an Adamax step if ``optimize``) and returns the loss."""
    optimizer = torch.optim.Adamax(params, lr=1e-3) if optimize else None
    loss_fn = HingeLoss()

    def step() -> float:
        loss = loss_fn(scores())
        for p in params:
            p.grad = None
        loss.backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            optimizer.step()
        return loss.item()

    return step


def measure(method: str, head: str, batch: int, steps: int, budget: float, head_only: bool) -> dict:
    """One process: ``method`` (ADAPT_FUSED is set by the parent for plain / fused)."""
    if head_only:
        regions, words, mask = inputs(batch, batch)
        module = similarity_head(head).train()
        params = [regions.requires_grad_(), words.requires_grad_(), *module.parameters()]
        loop = loop_t2i if head == "t2i" else loop_i2t
        scores = ((lambda: loop(module, regions, words, mask)) if method == "loop"
                  else (lambda: module(regions, words, mask, memory_budget_mb=budget)[0]))
        return time_steps(training_step(scores, params, optimize=False), steps)
    model, features, tokens = setup(head, batch)
    scores = ((lambda: loop_scores(model, head, features, tokens)) if method == "loop"
              else (lambda: model(features, tokens, memory_budget_mb=budget).scores))
    params = [p for p in model.parameters() if p.requires_grad]
    return time_steps(training_step(scores, params, optimize=True), steps)


def ddp_rank(rank: int, world_size: int, port: int, head: str, batch: int, steps: int, budget: float,
             threads: int, out: str) -> None:
    """One DDP process of ``--processes``: its shard of the global batch, scores of the whole batch."""
    import torch.distributed as dist

    from training.distributed import data_parallel

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model, features, tokens = setup(head, batch)
    shard = np.array_split(np.arange(batch), world_size)[rank]
    shard_tokens = TokenBatch(tokens.ids[shard], tokens.mask[shard])
    ddp = data_parallel(model, budget, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    result = time_steps(training_step(lambda: ddp(features[shard], shard_tokens), params, optimize=True), steps)
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure_ddp(processes: int, head: str, batch: int, steps: int, budget: float, threads: int) -> dict:
    """``processes`` gloo processes of ``threads // processes`` threads each; rank 0's times, the
    processes' summed peak RSS."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(ddp_rank, args=(processes, port, head, batch, steps, budget, max(1, threads // processes), out),
                 nprocs=processes)
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(processes)]
    return {**ranks[0], "peak_rss_mb": sum(r["peak_rss_mb"] for r in ranks)}


def run_child(method: str, head: str, args: argparse.Namespace, processes: int = 1) -> dict:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "ADAPT_FUSED": "0" if method == "plain" else "1"}
    command = [sys.executable, "-m", "benchmarks.train_speed", "--child", method, "--heads", head,
               "--batch", str(args.batch), "--steps", str(args.steps), "--budget-mb", str(args.budget_mb),
               "--threads", str(args.threads), "--processes", str(processes)]
    if args.head_only:
        command.append("--head-only")
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(name: str, r: dict) -> None:
    print(f"  {name:<34} {r['seconds']:7.2f} s/step ({r['cpu_seconds']:6.1f} CPU s)  "
          f"peak RSS {r['peak_rss_mb']:6.0f} MB  losses {', '.join(f'{x:.4f}' for x in r['losses'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", choices=["t2i", "i2t"], default=["t2i", "i2t"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["loop", "fused"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method, after one warm-up step")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--budget-mb", type=float, default=DEFAULT_MEMORY_BUDGET_MB,
                        help="adapt's memory budget for pair tensors (plain path)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of a one-process run, shared out among DDP processes")
    parser.add_argument("--processes", type=int, default=1,
                        help="also time the fused step under DDP on this many gloo processes")
    parser.add_argument("--head-only", action="store_true",
                        help="time the similarity head alone (encoded inputs), not the whole step")
    parser.add_argument("--quick", action="store_true", help="batch 32, 1 timed step")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps = 32, 1
    torch.set_num_threads(args.threads)
    if args.child:
        head = args.heads[0]
        result = (measure_ddp(args.processes, head, args.batch, args.steps, args.budget_mb, args.threads)
                  if args.processes > 1
                  else measure(args.child, head, args.batch, args.steps, args.budget_mb, args.head_only))
        print(json.dumps(result))
        return

    from adapt import fused

    if fused.kernels() is None and "fused" in args.methods:  # built here, outside the timed children
        sys.exit("the fused kernels are unavailable (ADAPT_FUSED=0 or no compiler); run --methods loop plain")
    if args.head_only and args.processes > 1:
        sys.exit("--processes times the whole step under DDP; drop --head-only")
    timed = ("the similarity head: forward + hinge loss + backward" if args.head_only
             else "encoders + similarity + hinge loss + Adamax")
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}; one "
          f"training step: batch {args.batch}, latent {LATENT}, {REGIONS} x {REGION_DIM} regions, {TOKENS}-token "
          f"captions, {timed}; mean of {args.steps} steps after 1 warm-up; every method shares adapt's "
          "encoders (the GRU unpacked, as the reference runs it: no caption has padding)")
    for head in args.heads:
        print(f"[{head}]")
        results = {}
        for method in args.methods:
            results[method] = run_child(method, head, args)
            report(method + (" (reference-shaped)" if method == "loop" else ""), results[method])
        if args.processes > 1:
            results["ddp"] = run_child("fused", head, args, args.processes)
            report(f"fused, DDP on {args.processes} processes", results["ddp"])
        first = results[args.methods[0]]["losses"][0]
        agree = all(abs(r["losses"][0] - first) <= 1e-4 * abs(first) for r in results.values())
        ratios = [f"{m} {results['loop']['seconds'] / r['seconds']:.1f}x faster than the loop "
                  f"({results['loop']['cpu_seconds'] / r['cpu_seconds']:.1f}x in CPU time)"
                  for m, r in results.items() if m != "loop" and "loop" in results]
        if "ddp" in results and "fused" in results:
            ratios.append(f"DDP on {args.processes} processes {results['fused']['seconds'] / results['ddp']['seconds']:.2f}x "
                          "the speed of one process")
        print(f"  {'; '.join(ratios)}{'; ' if ratios else ''}first losses agree: {agree}")


if __name__ == "__main__":
    main()
