"""Bidirectional hinge loss with the paper's schedule from sum- to max-of-violations."""

from __future__ import annotations

import torch
from torch import nn


class HingeLoss(nn.Module):
    """``J = k * J_max + (1 - k) * J_sum`` with ``k = 1 - eta ** iteration`` (paper, section 3.3).

    ``J_sum`` sums every margin violation of the in-batch negatives, in both directions (VSE);
    ``J_max`` keeps only the hardest negative of each query (VSE++). Early in training the sum
    dominates, later the max. As in the reference ``ContrastiveLoss``, the iteration counter is
    incremented *before* ``k`` is computed, once per call. The counter is a buffer, so it is part
    of ``state_dict()`` and survives a save/restore of the training state.

    Args:
        margin: ``alpha`` (0.2).
        eta: schedule base (0.991 in the reference's ADAPT configs).
    """

    def __init__(self, margin: float = 0.2, eta: float = 0.991) -> None:
        super().__init__()
        self.margin = margin
        self.eta = eta
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @property
    def k(self) -> float:
        """The current weight of the max-violation term."""
        return 1.0 - self.eta ** int(self.iteration)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """Loss of a square ``(n, n)`` score matrix whose diagonal holds the matching pairs.

        Rows are images and columns captions: ``scores[i, j] = s(image_i, caption_j)``.
        """
        if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
            raise ValueError(f"expected a square score matrix, got shape {tuple(scores.shape)}")
        self.iteration += 1
        positive = scores.diag()
        eye = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
        # Row i: captions ranked for image i. Column j: images ranked for caption j.
        cost_caption = (self.margin + scores - positive[:, None]).clamp(min=0).masked_fill(eye, 0)
        cost_image = (self.margin + scores - positive[None, :]).clamp(min=0).masked_fill(eye, 0)
        k = self.k
        summed = cost_caption.sum() + cost_image.sum()
        hardest = cost_caption.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
        return k * hardest + (1.0 - k) * summed
