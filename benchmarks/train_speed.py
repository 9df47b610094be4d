"""Training speed and peak memory of one ADAPT-T2I step against a per-caption loop, in the same run.

One step at the paper's size: batch 128, latent 1024, 36 regions of 2048-d features, 12-token
captions; region and text encoders, T2I similarity of the 128 x 128 batch, hinge loss, backward,
gradient clipping and an Adamax step. ``adapt`` scores all pairs as broadcast blocks (checkpointed
under a memory budget). The baseline is written plainly here, shaped like the reference
(``retrieval/model/similarity/similarity.py``, ``AdaptiveEmbeddingT2I``): BatchNorm over the images,
then for each caption FiLM + fovea + mean + cosine against all images, scores stacked. Both use the
same model and weights, so their first losses agree. Each runs in its own subprocess so its peak
RSS (``ru_maxrss``) is its own. Wall time and CPU time (``process_time``) are both printed: on a
shared machine the CPU time is the steadier of the two.

    python benchmarks/train_speed.py               # 1 warm-up + 3 timed steps each
    python benchmarks/train_speed.py --steps 5 --budget-mb 512
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

from adapt import AdaptConfig, AdaptModel, HingeLoss  # noqa: E402
from adapt.similarity import DEFAULT_MEMORY_BUDGET_MB, masked_mean  # noqa: E402

BATCH, LATENT, REGIONS, REGION_DIM, TOKENS, VOCAB = 128, 1024, 36, 2048, 12, 5000


def setup(batch: int) -> tuple[AdaptModel, torch.Tensor, object, torch.optim.Optimizer, HingeLoss]:
    """The same model, inputs and optimiser for both methods (fixed seeds)."""
    torch.manual_seed(0)
    vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(VOCAB)]
    model = AdaptModel(AdaptConfig(region_dim=REGION_DIM, latent_size=LATENT, similarity="t2i", vocab=vocab,
                                   word_vectors="random", word_dim=300)).train()
    g = torch.Generator().manual_seed(1)
    features = torch.randn(batch, REGIONS, REGION_DIM, generator=g)
    words = torch.randint(2, len(vocab), (batch, TOKENS), generator=g)
    tokens = model.tokenize([" ".join(vocab[i] for i in row) for row in words.tolist()])
    optimizer = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, features, tokens, optimizer, HingeLoss()


def loop_scores(model: AdaptModel, features: torch.Tensor, tokens) -> torch.Tensor:
    """Reference-shaped T2I scores ``(n_images, n_captions)``: one Python iteration per caption."""
    head = model.similarity.heads["t2i"]
    regions = model.encode_regions(features)
    words, mask = model.encode_text(tokens)
    images = head.norm(regions.transpose(1, 2))  # (n_images, d, n_regions), as the reference lays it out
    columns = []
    for c in range(len(words)):
        q = masked_mean(words[c : c + 1], mask[c : c + 1])  # (1, d)
        gamma, beta = head.adapt.fc_gamma(q), head.adapt.fc_beta(q)
        adapted = images * (gamma[..., None] + 1) + beta[..., None]
        adapted = adapted * torch.softmax(adapted * head.fovea.smooth, dim=-1)
        pooled = F.normalize(adapted.mean(-1), dim=-1)  # (n_images, d)
        columns.append(pooled @ F.normalize(q, dim=-1)[0])
    return torch.stack(columns, dim=1)


def measure(method: str, steps: int, batch: int, budget: float) -> dict:
    model, features, tokens, optimizer, loss_fn = setup(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    times, cpu_times, losses = [], [], []
    for _ in range(steps + 1):  # the first step warms up
        start, cpu_start = time.perf_counter(), time.process_time()
        if method == "loop":
            scores = loop_scores(model, features, tokens)
        else:
            scores = model(features, tokens, memory_budget_mb=budget).scores
        loss = loss_fn(scores)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
    return {"seconds": sum(times[1:]) / steps, "cpu_seconds": sum(cpu_times[1:]) / steps,
            "warmup_seconds": times[0], "losses": losses,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(method: str, steps: int, batch: int, budget: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(steps), "--batch", str(batch),
                          "--budget-mb", str(budget)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method, after one warm-up step")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--budget-mb", type=float, default=DEFAULT_MEMORY_BUDGET_MB,
                        help="adapt's memory budget for pair tensors")
    parser.add_argument("--child", choices=["loop", "adapt"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.batch, args.budget_mb)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one T2I training step: batch {args.batch}, "
          f"latent {LATENT}, {REGIONS} x {REGION_DIM} regions, {TOKENS}-token captions, Adamax; "
          f"mean of {args.steps} steps after 1 warm-up")
    results = {m: run_child(m, args.steps, args.batch, args.budget_mb) for m in ("loop", "adapt")}
    for name, r in (("per-caption loop (reference-shaped)", results["loop"]),
                    (f"adapt (memory budget {args.budget_mb:g} MB)", results["adapt"])):
        print(f"  {name:<40} {r['seconds']:6.2f} s/step  {1 / r['seconds']:6.3f} it/s  "
              f"({r['cpu_seconds']:6.1f} CPU s/step)  peak RSS {r['peak_rss_mb']:7.0f} MB   "
              f"losses {', '.join(f'{x:.4f}' for x in r['losses'])}")
    loop, ours = results["loop"], results["adapt"]
    agree = abs(loop["losses"][0] - ours["losses"][0]) < 1e-3 * abs(loop["losses"][0])
    print(f"  speed-up {loop['seconds'] / ours['seconds']:.2f}x (in CPU time "
          f"{loop['cpu_seconds'] / ours['cpu_seconds']:.2f}x), peak memory "
          f"{loop['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x lower; first losses agree: {agree}")


if __name__ == "__main__":
    main()
