"""ADAPT similarity between every image and every caption: T2I, I2T and their ensemble.

Each direction scores all ``(image, caption)`` pairs at once, block by block: a block of ``c``
captions x ``m`` images is one broadcast tensor of shape ``(c, m, n_locals, d)`` (the layout of
:mod:`adapt.layers`). Blocks are sized to stay in the CPU cache and never above a memory
budget, so peak memory does not grow with the gallery; no Python loop runs per caption or per
image. When gradients are needed, each block is checkpointed (recomputed in the backward pass) so
training memory stays bounded too. On CPU the fused kernels of :mod:`adapt.fused` compute the same
scores in one pass per pair, both directions, for inference and training (each with a fused
backward). Attention maps, CUDA, machines without a compiler and I2T captions with padding before
a real token take the PyTorch path.

Attention maps, on request:

- T2I: each region's share of the score. The score is ``cos(p, q) = p . q_unit / |p|`` with
  ``p = (sum_i scale * B_i * M_i + beta) / n``, so it splits exactly into one term per region,
  ``(scale * B_i * M_i) . q_unit / (n |p|)``, plus the caption's own ``beta . q_unit / (n |p|)``.
  A region's term is large when the caption's fovea weights it *and* its adapted feature points
  along the caption: this is where the caption looked, in the units of the score. (The fovea mask
  alone, averaged over channels, is close to uniform and nearly the same for every caption.)
- I2T: the fovea mask ``M`` averaged over the ``d`` channels, a distribution over the words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapt import fused
from adapt.layers import Adapt, Fovea

DEFAULT_MEMORY_BUDGET_MB = 256.0
REFERENCE_MAX_TOKENS = 34  # the reference I2T cuts captions here (similarity.py, AdaptiveEmbeddingI2T)
_TENSORS_PER_PAIR = 6  # live (n_locals, d) float tensors per pair in a block, backward included
_CACHE_BLOCK_BYTES = 4 * 2**20  # one block tensor this big stays in L2/L3: measured ~8x faster
# on 2 cores than blocks of hundreds of MB (benchmarks/score_speed.py)

BlockFn = Callable[[slice, slice], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class Scores:
    """Output of :class:`AdaptiveSimilarity`.

    Attributes:
        scores: ``(n_images, n_captions)`` cosine similarities.
        region_attention: ``(n_images, n_captions, n_regions)`` each region's share of the T2I
            score (see the module docstring), when asked for and the model has T2I.
        token_attention: ``(n_images, n_captions, n_tokens)`` I2T fovea weight of each word,
            when asked for and the model has I2T.
    """

    scores: torch.Tensor
    region_attention: torch.Tensor | None = None
    token_attention: torch.Tensor | None = None


def _normalization(kind: str, latent_size: int) -> nn.Module:
    # The reference normalises the adapted modality with BatchNorm1d(affine=False).
    return nn.BatchNorm1d(latent_size, affine=False) if kind == "batchnorm" else nn.Identity()


def _blockwise(
    n_rows: int, n_cols: int, pair_bytes: int, memory_budget_mb: float, block: BlockFn
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``block(rows, cols) -> (scores (r, c), attention (r, c, n) or None)`` over all blocks.

    ``pair_bytes`` is the size of one pair's ``(n_locals, d)`` tensor. A block holds at most
    ``memory_budget_mb`` of pair tensors and, for inference, about ``_CACHE_BLOCK_BYTES`` per
    tensor. Blocks are checkpointed under autograd.
    """
    budget_pairs = int(memory_budget_mb * 2**20) // (_TENSORS_PER_PAIR * pair_bytes)
    grad = torch.is_grad_enabled()
    # Under autograd every block is checkpointed and recomputed: few large blocks beat many
    # cache-sized ones there (measured ~2.5x on a training step at batch 64).
    max_pairs = max(1, budget_pairs if grad else min(budget_pairs, _CACHE_BLOCK_BYTES // pair_bytes))
    col_step = min(n_cols, max_pairs)
    row_step = max(1, min(n_rows, max_pairs // col_step))
    score_rows, attention_rows = [], []
    for r0 in range(0, n_rows, row_step):
        rows = slice(r0, min(n_rows, r0 + row_step))
        parts = [
            checkpoint(block, rows, slice(c0, min(n_cols, c0 + col_step)), use_reentrant=False)
            if grad
            else block(rows, slice(c0, min(n_cols, c0 + col_step)))
            for c0 in range(0, n_cols, col_step)
        ]
        score_rows.append(torch.cat([p[0] for p in parts], dim=1))
        if parts[0][1] is not None:
            attention_rows.append(torch.cat([p[1] for p in parts], dim=1))
    attention = torch.cat(attention_rows, dim=0) if attention_rows else None
    return torch.cat(score_rows, dim=0), attention


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid locals: ``(n, t, d)``, ``(n, t)`` bool -> ``(n, d)``."""
    weights = mask.to(features.dtype).unsqueeze(-1)
    return (features * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class Modulation(NamedTuple):
    """Global vectors of one modality and the ADAPT parameters they give, each ``(n, d)``.

    Attributes:
        query: the global vectors ``q``.
        scale: ``gamma(q) + 1``.
        shift: ``beta(q)``.
        query_unit: ``q / |q|``, what the pooled locals are compared with.
    """

    query: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    query_unit: torch.Tensor


class SimilarityHead(nn.Module):
    """One way to score every image against every caption: a direction of ADAPT or the baseline.

    :meth:`forward` is the call of every head; subclasses implement :meth:`score_pairs`.

    Attributes:
        attention_field: the :class:`Scores` field its attention fills, ``None`` if it has none.
    """

    attention_field: str | None = None

    def forward(
        self,
        regions: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        *,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score all pairs.

        Args:
            regions: ``(n_images, n_regions, d)`` encoded regions.
            words: ``(n_captions, n_tokens, d)`` encoded words.
            word_mask: ``(n_captions, n_tokens)`` bool, True for real tokens.
            memory_budget_mb: bound on the pair tensors alive at once.
            return_attention: also return the attention (see the module docstring).

        Returns:
            ``scores (n_images, n_captions)`` and the attention ``(n_images, n_captions, n_locals)``
            over the regions or words (:attr:`attention_field`), or ``None`` unless asked for.
        """
        return self.score_pairs(regions, words, word_mask, memory_budget_mb, return_attention)

    def score_pairs(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, memory_budget_mb: float,
        return_attention: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` with every argument given."""
        raise NotImplementedError


class AdaptHead(SimilarityHead):
    """What both ADAPT directions share: the normalisation of the adapted modality's locals, the
    ADAPT layer driven by the other modality's global vector, and the fovea.

    Args:
        latent_size: ``d``.
        smooth: the fovea's ``lambda``.
        normalization: ``"batchnorm"`` or ``"none"`` (see :class:`~adapt.config.AdaptConfig`).
    """

    def __init__(self, latent_size: int, smooth: float, normalization: str) -> None:
        super().__init__()
        self.norm = _normalization(normalization, latent_size)
        self.adapt = Adapt(latent_size, latent_size)
        self.fovea = Fovea(smooth)

    def modulate(self, query: torch.Tensor) -> Modulation:
        """The :class:`Modulation` of global vectors ``query (n, d)``."""
        scale, shift = self.adapt.modulation(query)
        return Modulation(query, scale, shift, F.normalize(query, dim=-1))


class TextToImage(AdaptHead):
    """ADAPT-T2I: the caption's mean word vector adapts the image regions (paper, eq. 1-4).

    For caption ``q`` (mean of its valid words) and image regions ``B`` (after BatchNorm):
    ``score = cos(mean_i fovea(B_i * (gamma(q) + 1) + beta(q)), q)``. :meth:`prepare_images` and
    :meth:`prepare_queries` are the only place that computes ``B`` and ``q``: the blockwise and
    fused paths here and gallery search (:mod:`adapt.search`) all start from them.
    """

    attention_field = "region_attention"

    def prepare_images(self, regions: torch.Tensor) -> torch.Tensor:
        """The normalised regions ``B``: ``(n_images, n_regions, d)`` encoded -> same shape,
        contiguous. BatchNorm runs over all images and regions at once, as in the reference."""
        return self.norm(regions.transpose(1, 2)).transpose(1, 2).contiguous()

    def prepare_queries(self, words: torch.Tensor, word_mask: torch.Tensor) -> Modulation:
        """Each caption's :class:`Modulation`, ``(n_captions, d)`` fields, from its encoded
        ``words (n_captions, n_tokens, d)``: ``q`` is the mean of the ``word_mask`` tokens."""
        return self.modulate(masked_mean(words, word_mask))

    def score_pairs(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, memory_budget_mb: float,
        return_attention: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``scores (n_images, n_captions)`` and ``attention (n_images, n_captions, n_regions)``
        (``None`` unless asked for): the regions' terms of the score, which sum to the score less
        the caption's ``beta`` term."""
        n_images, n_regions, d = regions.shape
        images = self.prepare_images(regions)
        captions = self.prepare_queries(words, word_mask)
        scale, shift, query_unit = captions.scale, captions.shift, captions.query_unit
        if not return_attention and fused.usable(images, scale):
            return fused.t2i_scores(images, scale, shift, query_unit, self.fovea.smooth), None

        def block(caps: slice, ims: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
            values = images[ims].unsqueeze(0)  # (1, m, r, d)
            # beta(q) is the same for every region, so it cancels in the fovea's softmax; and as
            # the mask sums to 1 over regions, mean_i(A_i M_i) = (scale * sum_i B_i M_i + beta) / n.
            mask = self.fovea.mask(values * scale[caps, None, None])  # (c, m, r, d)
            pooled = (scale[caps, None] * (values * mask).sum(-2) + shift[caps, None]) / n_regions
            score = torch.einsum("cmd,cd->cm", F.normalize(pooled, dim=-1), query_unit[caps])
            if not return_attention:
                return score, None
            norm = pooled.norm(dim=-1).clamp(min=1e-12) * n_regions  # (c, m)
            weighted = values * mask * (scale * query_unit)[caps, None, None]  # (c, m, r, d)
            return score, weighted.sum(-1) / norm[..., None]

        pair_bytes = n_regions * d * regions.element_size()
        scores, attention = _blockwise(
            len(words), n_images, pair_bytes, memory_budget_mb, block
        )
        return scores.t(), None if attention is None else attention.transpose(0, 1)


class ImageToText(AdaptHead):
    """ADAPT-I2T: the image's mean region vector adapts the caption's words.

    For image ``q`` (mean of its regions) and words ``W`` (after BatchNorm):
    ``score = cos(max_t fovea(W_t * (gamma(q) + 1) + beta(q)), q)``. Padding may sit anywhere in
    a caption (the fused kernel takes captions padded at the end; others take the PyTorch path).

    Args:
        reference_padding: reproduce the reference: cut captions to 34 tokens and include padding
            in BatchNorm, the fovea softmax and the max-pooling.
    """

    attention_field = "token_attention"

    def __init__(
        self, latent_size: int, smooth: float, normalization: str, reference_padding: bool = False
    ) -> None:
        super().__init__(latent_size, smooth, normalization)
        self.reference_padding = reference_padding

    def prepare_captions(
        self, words: torch.Tensor, word_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The normalised words ``W`` and which of them count.

        Args:
            words: ``(n_captions, n_tokens, d)`` encoded words.
            word_mask: ``(n_captions, n_tokens)`` bool, True for real tokens.

        Returns:
            ``(n_captions, t, d)`` contiguous normalised words and their ``(n_captions, t)`` mask;
            with ``reference_padding``, ``t`` is at most 34 and the mask ``None`` (padding counts).
        """
        if self.reference_padding:
            words = words[:, :REFERENCE_MAX_TOKENS]
            return self.norm(words.transpose(1, 2)).transpose(1, 2).contiguous(), None
        # Statistics over real tokens only; padding stays exactly zero.
        normed = self.norm(words[word_mask])
        return torch.zeros_like(words).index_put((word_mask,), normed), word_mask

    def prepare_queries(self, regions: torch.Tensor) -> Modulation:
        """Each image's :class:`Modulation`, ``(n_images, d)`` fields, from its encoded
        ``regions (n_images, n_regions, d)``: ``q`` is their mean."""
        return self.modulate(regions.mean(dim=1))

    def score_pairs(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, memory_budget_mb: float,
        return_attention: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``scores (n_images, n_captions)`` and ``attention (n_images, n_captions, n_tokens)``
        (``None`` unless asked for): the fovea mask averaged over the channels."""
        captions, local_mask = self.prepare_captions(words, word_mask)
        n_captions, n_tokens, d = captions.shape
        images = self.prepare_queries(regions)
        scale, shift, query_unit = images.scale, images.shift, images.query_unit
        if not return_attention and fused.usable(captions, scale):
            lengths = _leading_lengths(local_mask, n_captions, n_tokens)
            if lengths is not None:
                return fused.i2t_scores(captions, lengths, scale, shift, query_unit,
                                        self.fovea.smooth), None

        def block(ims: slice, caps: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
            values = captions[caps].unsqueeze(0)  # (1, c, t, d)
            adapted = values * scale[ims, None, None] + shift[ims, None, None]  # (m, c, t, d)
            valid = None if local_mask is None else local_mask[caps].unsqueeze(0)  # (1, c, t)
            mask = self.fovea.mask(adapted, valid)
            foveated = adapted * mask
            if valid is not None:
                foveated = foveated.masked_fill(~valid.unsqueeze(-1), float("-inf"))
            pooled = foveated.amax(dim=-2)  # (m, c, d)
            score = torch.einsum("mcd,md->mc", F.normalize(pooled, dim=-1), query_unit[ims])
            return score, mask.mean(dim=-1) if return_attention else None

        pair_bytes = n_tokens * d * words.element_size()
        return _blockwise(len(regions), n_captions, pair_bytes, memory_budget_mb, block)


def _leading_lengths(
    local_mask: torch.Tensor | None, n_captions: int, n_tokens: int
) -> torch.Tensor | None:
    """``(n_captions,)`` valid tokens per caption when they come first in every caption, the
    layout the fused I2T kernel reads (all ``n_tokens`` when ``local_mask`` is ``None``);
    ``None`` when some caption has padding before a real token (e.g. padded on the left)."""
    if local_mask is None:
        return torch.full((n_captions,), n_tokens)
    lengths = local_mask.sum(1)
    leading = torch.arange(n_tokens, device=local_mask.device) < lengths[:, None]
    return lengths if torch.equal(leading, local_mask) else None


class MeanPooled(SimilarityHead):
    """The baseline without ADAPT (VSE-style): ``cos(mean of regions, mean of valid words)``.

    Used as the paper-style ablation, and as a query-independent first stage for large galleries,
    which indexes :meth:`image_vectors` and queries them with :meth:`caption_vectors`.
    """

    @staticmethod
    def image_vectors(regions: torch.Tensor) -> torch.Tensor:
        """``(n_images, n_regions, d)`` encoded regions -> ``(n_images, d)`` unit mean vectors."""
        return F.normalize(regions.mean(dim=1), dim=-1)

    @staticmethod
    def caption_vectors(words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """``(n_captions, n_tokens, d)`` encoded words, ``(n_captions, n_tokens)`` mask ->
        ``(n_captions, d)`` unit mean vectors of the real tokens."""
        return F.normalize(masked_mean(words, word_mask), dim=-1)

    def score_pairs(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, memory_budget_mb: float,
        return_attention: bool,
    ) -> tuple[torch.Tensor, None]:
        """``scores (n_images, n_captions)``; there is no attention to return."""
        return self.image_vectors(regions) @ self.caption_vectors(words, word_mask).t(), None


class AdaptiveSimilarity(nn.Module):
    """The similarity head of a model: T2I, I2T, or the ensemble (mean of both score matrices).

    The baseline without ADAPT (``"mean"``: cosine of the mean-pooled encoded regions and words) has
    no parameters, so every model can also score with it: the same encoders without the adaptation.

    Args:
        directions: the model's own kind: ``("t2i",)``, ``("i2t",)``, ``("t2i", "i2t")``, or
            ``("mean",)`` for a model trained as the baseline.
    """

    def __init__(
        self,
        directions: tuple[str, ...],
        latent_size: int,
        lambda_t2i: float,
        lambda_i2t: float,
        normalization: str,
        reference_padding: bool = False,
    ) -> None:
        super().__init__()
        self.directions = tuple(directions)
        heads: dict[str, SimilarityHead] = {}
        if "t2i" in self.directions:
            heads["t2i"] = TextToImage(latent_size, lambda_t2i, normalization)
        if "i2t" in self.directions:
            heads["i2t"] = ImageToText(latent_size, lambda_i2t, normalization, reference_padding)
        heads["mean"] = MeanPooled()
        self.heads = nn.ModuleDict(heads)

    def forward(
        self,
        regions: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        *,
        directions: tuple[str, ...] | None = None,
        return_attention: bool = False,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    ) -> Scores:
        """Score every image against every caption.

        Args:
            regions: ``(n_images, n_regions, d)`` encoded regions.
            words: ``(n_captions, n_tokens, d)`` encoded words.
            word_mask: ``(n_captions, n_tokens)`` bool, True for real tokens.
            directions: the heads to use (default: the model's own kind), its own and
                ``"mean"``; several are averaged.
            return_attention: also return the attention maps (see the module docstring).
            memory_budget_mb: bound on the pair tensors alive at once, per direction.
        """
        directions = self.directions if directions is None else tuple(directions)
        missing = [d for d in directions if d not in self.heads]
        if missing or not directions:
            raise ValueError(f"directions {directions} not available; model has {tuple(self.heads)}")
        out = Scores(scores=regions.new_zeros(len(regions), len(words)))
        for name in directions:
            scores, attention = self.heads[name](
                regions, words, word_mask, memory_budget_mb=memory_budget_mb,
                return_attention=return_attention,
            )
            out.scores = out.scores + scores / len(directions)
            if attention is not None:
                setattr(out, self.heads[name].attention_field, attention)
        return out
