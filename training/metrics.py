"""Retrieval metrics of a score matrix: R@K, median and mean rank, rsum; COCO folds; Markdown.

Pure functions of an ``(n_images, n_captions)`` score matrix in which caption ``c`` belongs to image
``c // captions_per_image`` (the precomp layout). The two directions, as in VSE++ / SCAN and the
reference's ``evaluation.py``:

- ``i2t`` (image -> text, "annotation"): each image ranks all captions; its rank is that of its
  best-ranked own caption.
- ``t2i`` (text -> image, "retrieval"): each caption ranks all images; its rank is that of its image.

(These are the *query directions* of the benchmark, not the ADAPT-T2I / ADAPT-I2T model variants.)

Ranks are 0-based: the number of wrong candidates scoring at least as high as the right one. The
reference breaks ties by ``argsort`` order; here ties count against the model, so a model that
scores everything alike gets chance-level recall instead of a perfect one. NaN scores count as
worst for a right candidate and best for a wrong one, for the same reason (a diverged model must
not look good).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

METRICS = ("r1", "r5", "r10", "medr", "meanr")
DIRECTIONS = ("i2t", "t2i")
_BLOCK = 512  # queries ranked at once: bounds the (block, n_candidates) temporaries


def _check(scores: torch.Tensor, captions_per_image: int) -> tuple[int, int]:
    if scores.ndim != 2:
        raise ValueError(f"expected a (n_images, n_captions) score matrix, got shape {tuple(scores.shape)}")
    n_images, n_captions = scores.shape
    if n_images == 0 or n_captions != n_images * captions_per_image:
        raise ValueError(f"a score matrix for {n_images} images must have {captions_per_image} captions per "
                         f"image ({n_images * captions_per_image} columns), got {n_captions}")
    return n_images, n_captions


def image_to_text_ranks(scores: torch.Tensor, captions_per_image: int) -> torch.Tensor:
    """``(n_images, n_captions)`` -> ``(n_images,)``: rank of each image's best own caption."""
    n_images, n_captions = _check(scores, captions_per_image)
    owner = torch.arange(n_captions, device=scores.device) // captions_per_image
    ranks = []
    for start in range(0, n_images, _BLOCK):
        block = scores[start : start + _BLOCK].float()
        own = owner[None, :] == torch.arange(start, start + len(block), device=scores.device)[:, None]
        best = block.nan_to_num(nan=-math.inf).masked_fill(~own, -math.inf).amax(dim=1)
        wrong = block.nan_to_num(nan=math.inf).masked_fill(own, -math.inf)
        ranks.append((wrong >= best[:, None]).sum(dim=1))
    return torch.cat(ranks).cpu()


def text_to_image_ranks(scores: torch.Tensor, captions_per_image: int) -> torch.Tensor:
    """``(n_images, n_captions)`` -> ``(n_captions,)``: rank of each caption's image."""
    n_images, n_captions = _check(scores, captions_per_image)
    ranks = []
    for start in range(0, n_captions, _BLOCK):
        block = scores[:, start : start + _BLOCK].float()  # (n_images, c)
        owner = torch.arange(start, start + block.shape[1], device=scores.device) // captions_per_image
        own = torch.arange(n_images, device=scores.device)[:, None] == owner[None, :]
        right = block.nan_to_num(nan=-math.inf)[owner, torch.arange(block.shape[1], device=scores.device)]
        wrong = block.nan_to_num(nan=math.inf).masked_fill(own, -math.inf)
        ranks.append((wrong >= right[None, :]).sum(dim=0))
    return torch.cat(ranks).cpu()


def summarize_ranks(ranks: torch.Tensor | np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), median and mean rank (1-based), as the reference computes them."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {
        "r1": 100.0 * float(np.mean(ranks < 1)),
        "r5": 100.0 * float(np.mean(ranks < 5)),
        "r10": 100.0 * float(np.mean(ranks < 10)),
        "medr": float(np.floor(np.median(ranks)) + 1),
        "meanr": float(ranks.mean() + 1),
    }


def retrieval_metrics(scores: torch.Tensor, captions_per_image: int = 5) -> dict[str, float]:
    """Both directions' metrics, keyed ``i2t_r1`` ... ``t2i_meanr``, and ``rsum`` (sum of the 6 recalls)."""
    out = {f"i2t_{k}": v for k, v in summarize_ranks(image_to_text_ranks(scores, captions_per_image)).items()}
    out.update({f"t2i_{k}": v for k, v in summarize_ranks(text_to_image_ranks(scores, captions_per_image)).items()})
    out["rsum"] = sum(out[f"{d}_{r}"] for d in DIRECTIONS for r in ("r1", "r5", "r10"))
    return out


def fold_slices(n_images: int, n_folds: int, captions_per_image: int = 5) -> list[tuple[slice, slice]]:
    """``(images, captions)`` slices of ``n_folds`` consecutive equal folds.

    COCO 1K is ``fold_slices(5000, 5)`` on the 5000 test images: images ``[1000 i, 1000 (i+1))`` with
    their 5000 captions, as in SCAN's ``evalrank(fold5=True)``.
    """
    if n_folds < 1 or n_images % n_folds:
        raise ValueError(f"cannot split {n_images} images into {n_folds} equal folds")
    size = n_images // n_folds
    return [(slice(i * size, (i + 1) * size), slice(i * size * captions_per_image, (i + 1) * size * captions_per_image))
            for i in range(n_folds)]


def mean_metrics(folds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Metric-wise mean over folds (COCO 1K reports the mean of the 5 folds, ranks included)."""
    return {k: float(np.mean([f[k] for f in folds])) for k in folds[0]}


def markdown_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table, one row per named metrics dict (``retrieval_metrics`` keys)."""
    header = ("| | Image→Text R@1 | R@5 | R@10 | MedR | MeanR | Text→Image R@1 | R@5 | R@10 | MedR | MeanR | rsum |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for name, m in rows.items():
        cells = [f"{m[f'{d}_{k}']:.1f}" for d in DIRECTIONS for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['rsum']:.1f} |")
    return "\n".join(lines)
