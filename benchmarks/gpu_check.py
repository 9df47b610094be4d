"""A GPU check, ready to run in under 5 minutes: speed at the paper's sizes, and CUDA against CPU.

    python -m benchmarks.gpu_check            # on a CUDA machine (the paper's sizes)
    python -m benchmarks.gpu_check --smoke    # tiny sizes, on CPU if there is no GPU: checks it runs

On the device it measures:

- bottom-up attention images/s at a 600 x 1000 input (the published extractor's settings: 300
  proposals, 36 regions), random weights in the published layout (the cost does not depend on the
  values);
- one ADAPT-T2I and one ADAPT-I2T training step at the paper's batch (128 pairs, d = 1024, 36 x 2048
  regions; the text side of ``training/configs/f30k_*.yaml`` with 300-d frozen word vectors, the
  size of the paper's GloVe 840B, and a 10,000-word vocabulary, about Flickr30k's), with AMP as
  ``training.train`` runs it (bf16 where supported, else fp16 with a GradScaler): pairs/s;
- scoring: images x captions pairs/s in eval mode (T2I and I2T).

And it checks the device's results against the CPU's (float32 on both, no AMP): the scores of a
batch, a training step's loss and the bottom-up features and boxes of one image must agree to
``--tolerance`` (1e-3), relative to the largest magnitude. It prints one line per measurement and
exits with status 1 when a check fails. ``--smoke`` shrinks everything (64-px photo, 8 proposals,
batch 8, d = 32) so that it runs on a CPU in seconds; there the "device" is the CPU itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from adapt import AdaptConfig, AdaptModel, HingeLoss
from adapt.regions import BottomUpAttentionExtractor
from benchmarks.extract_speed import write_random_bottom_up_weights
from training.config import load_config

CONFIGS = {"t2i": "training/configs/f30k_t2i.yaml", "i2t": "training/configs/f30k_i2t.yaml"}
ROOT = Path(__file__).resolve().parents[1]
PAPER = {"batch": 128, "latent": 1024, "regions": 36, "region_dim": 2048, "word_dim": 300, "vocab": 10_000,
         "tokens": 12, "score_images": 1000, "score_captions": 5000, "short_side": 600, "max_side": 1000,
         "proposals": 300, "butd_images": 10, "steps": 5}
SMOKE = {"batch": 8, "latent": 32, "regions": 36, "region_dim": 2048, "word_dim": 16, "vocab": 50, "tokens": 6,
         "score_images": 8, "score_captions": 16, "short_side": 64, "max_side": 96, "proposals": 8,
         "butd_images": 1, "steps": 1}


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value - reference| / max |reference|`` (0 for two empty or all-zero tensors)."""
    value, reference = value.detach().float().cpu(), reference.detach().float().cpu()
    if value.shape != reference.shape:
        return float("inf")
    scale = reference.abs().max().item() if reference.numel() else 0.0
    return (value - reference).abs().max().item() / scale if scale > 0 else 0.0


def timed(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``run`` after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ---- bottom-up attention ------------------------------------------------------------------------


def check_bottom_up(size: dict, device: torch.device, folder: Path) -> dict[str, float]:
    """Images/s of the extractor on ``device`` and its features' and boxes' distance to the CPU's."""
    from skimage import data

    weights = write_random_bottom_up_weights(folder / "bottom_up.bin")
    photo = Image.fromarray(data.astronaut()).resize((size["max_side"], size["short_side"]))
    settings = {"short_side": size["short_side"], "max_side": size["max_side"], "num_proposals": size["proposals"]}
    on_device = BottomUpAttentionExtractor(weights, device=device, **settings)
    seconds = timed(lambda: on_device.extract_batch([photo] * size["butd_images"], batch_size=1), device, 1)
    on_cpu = BottomUpAttentionExtractor(weights, device="cpu", **settings)
    ours, reference = on_device.extract(photo), on_cpu.extract(photo)
    return {"butd_images_per_s": size["butd_images"] / seconds,
            "butd_features_diff": relative_difference(torch.from_numpy(ours.features), torch.from_numpy(reference.features)),
            "butd_boxes_diff": relative_difference(torch.from_numpy(ours.boxes), torch.from_numpy(reference.boxes))}


# ---- training and scoring -----------------------------------------------------------------------


def build(head: str, size: dict) -> tuple[AdaptModel, torch.Tensor, list[str]]:
    """The paper's model for ``head`` (a Flickr30k config's fields at ``size``), region features
    ``(n, 36, 2048)`` and captions of random vocabulary words."""
    fields = dict(load_config(ROOT / CONFIGS[head]).model)
    vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(size["vocab"])]
    fields.update(latent_size=size["latent"], region_dim=size["region_dim"], word_dim=size["word_dim"],
                  word_vectors="random", vocab=vocab)
    torch.manual_seed(0)
    model = AdaptModel(AdaptConfig.from_dict(fields))
    g = torch.Generator().manual_seed(1)
    n = max(size["batch"], size["score_images"])
    features = torch.randn(n, size["regions"], size["region_dim"], generator=g)
    n_captions = max(size["batch"], size["score_captions"])
    words = torch.randint(2, len(vocab), (n_captions, size["tokens"]), generator=g)
    return model, features, [" ".join(vocab[i] for i in row) for row in words.tolist()]


def step_loss(model: AdaptModel, features: torch.Tensor, tokens: Any, amp: torch.dtype | None,
              optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> float:
    """One training step as ``training.train`` takes it (autocast, hinge loss, clip 2.0, Adamax)."""
    device = model.device
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        scores = model(features.to(device), tokens).scores
    loss = HingeLoss()(scores.float())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def check_head(head: str, size: dict, device: torch.device) -> dict[str, float]:
    """Training pairs/s with AMP, scoring pairs/s, and the float32 loss and scores against the CPU's."""
    model, features, tokens = build(head, size)
    batch = size["batch"]
    train_features, train_tokens = features[:batch], tokens[:batch]
    first = {}
    for where in (torch.device("cpu"), device):
        # The same weights on each device: the first float32 step's loss, and eval-mode scores.
        copy = AdaptModel(model.config).to(where)
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            first[where.type + "_scores"] = copy.eval()(features[:batch].to(where), tokens[:batch]).scores.cpu()
        copy.train()
        optimizer = torch.optim.Adamax(copy.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(where.type, enabled=False)
        first[where.type + "_loss"] = torch.tensor(step_loss(copy, train_features, train_tokens, None, optimizer, scaler))
    results = {f"{head}_scores_diff": relative_difference(first[device.type + "_scores"], first["cpu_scores"]),
               f"{head}_loss_diff": relative_difference(first[device.type + "_loss"], first["cpu_loss"])}

    model = model.to(device).train()
    cuda = device.type == "cuda"
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    seconds = timed(lambda: step_loss(model, train_features, train_tokens, amp, optimizer, scaler), device, size["steps"])
    results[f"{head}_train_pairs_per_s"] = batch / seconds

    model.eval()
    images, captions = features[:size["score_images"]].to(device), tokens[:size["score_captions"]]

    def score() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(images, captions)

    results[f"{head}_score_pairs_per_s"] = size["score_images"] * size["score_captions"] / timed(score, device, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs (CPU is fine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest relative CUDA-CPU difference")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --smoke (CPU) or on a GPU machine")
    if device.type == "cpu" and not args.smoke:
        parser.error("the paper-size run is for a GPU; on a CPU pass --smoke")
    size = SMOKE if args.smoke else PAPER
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {'smoke sizes' if args.smoke else 'paper sizes'}", flush=True)
    start = time.perf_counter()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results.update(check_bottom_up(size, device, Path(tmp)))
    for head in ("t2i", "i2t"):
        results.update(check_head(head, size, device))
    failed = [key for key, value in results.items() if key.endswith("_diff") and not value <= args.tolerance]
    for key, value in results.items():
        verdict = ("  FAIL" if key in failed else "  ok") if key.endswith("_diff") else ""
        print(f"{key:<26} {value:.4g}{verdict}")
    print(f"total {time.perf_counter() - start:.0f} s; {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
