r"""ADAPT and the fovea: the paper's contribution, and nothing else.

Wehrmann, Kolling, Barros, "Adaptive Cross-modal Embeddings for Image-Text Alignment", AAAI 2020,
section 3. With :math:`A` the local features of the modality that is adapted (``n`` locals of size
``d``) and :math:`\mathbf{q}` the global vector of the other modality:

.. math::

    \gamma = W_\gamma \mathbf{q} + b_\gamma, \qquad \beta = W_\beta \mathbf{q} + b_\beta

    \bar{A}_i = A_i \odot (\gamma + 1) + \beta                      \quad\text{(ADAPT / FiLM)}

    M_{ij} = \frac{\exp(\lambda \bar{A}_{ij})}{\sum_{k=1}^{n} \exp(\lambda \bar{A}_{kj})}
                                                                    \quad\text{(fovea mask)}

    \text{fovea}(\bar{A}) = \bar{A} \odot M

The ``+ 1`` on :math:`\gamma` follows the reference implementation (``retrieval/model/layers/
adapt.py``): a zero-initialised-like projection starts as the identity. Since :math:`\beta` is the
same for every local, it cancels inside the softmax: :math:`M` depends on :math:`\gamma` only.

Layout: local features are ``(..., n_locals, d)``; the fovea's softmax runs over the locals with
the ``d`` channels contiguous, which vectorises well for any number of locals (the reference is
channels-first).
"""

from __future__ import annotations

import torch
from torch import nn


class Adapt(nn.Module):
    """Feature-wise linear modulation of local features by a global query vector.

    Args:
        query_dim: size of the query vector ``q``.
        value_dim: size ``d`` of each local feature.
    """

    def __init__(self, query_dim: int, value_dim: int) -> None:
        super().__init__()
        self.fc_gamma = nn.Linear(query_dim, value_dim)
        self.fc_beta = nn.Linear(query_dim, value_dim)

    def modulation(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma + 1, beta)`` for queries of shape ``(..., query_dim)``, each ``(..., d)``."""
        return self.fc_gamma(query) + 1.0, self.fc_beta(query)

    def forward(self, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Adapt local features to a query.

        Args:
            values: ``(..., n_locals, d)`` local features.
            query: ``(..., query_dim)`` global vectors, broadcast against ``values``' batch axes.

        Returns:
            ``(..., n_locals, d)``: ``values * (gamma + 1) + beta``.
        """
        scale, shift = self.modulation(query)
        return values * scale.unsqueeze(-2) + shift.unsqueeze(-2)


class Fovea(nn.Module):
    """Per-channel softmax over the local axis, used as a multiplicative mask.

    Args:
        smooth: the sharpness ``lambda``.
    """

    def __init__(self, smooth: float) -> None:
        super().__init__()
        self.smooth = float(smooth)

    def mask(self, adapted: torch.Tensor, local_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The fovea mask ``M``: softmax over the locals (axis ``-2``) of ``lambda * adapted``.

        Args:
            adapted: ``(..., n_locals, d)``.
            local_mask: optional ``(..., n_locals)`` bool, False for padding; padded locals get
                weight 0 (the reference does not mask; see ``AdaptConfig.reference_padding``).
        """
        logits = adapted * self.smooth
        if local_mask is not None:
            logits = logits.masked_fill(~local_mask.unsqueeze(-1), float("-inf"))
        return torch.softmax(logits, dim=-2)

    def forward(
        self, adapted: torch.Tensor, local_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``adapted * M``, shape ``(..., n_locals, d)``."""
        return adapted * self.mask(adapted, local_mask)
