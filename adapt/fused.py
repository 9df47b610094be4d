"""The fused CPU kernels of ``csrc/fused.cpp``: ADAPT scores without materialising adapted tensors.

The C++ extension is compiled on first use (about a minute, cached by torch in
``TORCH_EXTENSIONS_DIR``) with ``-O3 -march=native -ffast-math`` so the exponentials vectorise. If
no compiler is available, :func:`kernels` returns ``None`` and :mod:`adapt.similarity` keeps its
plain PyTorch path, which computes the same scores.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "fused.cpp"


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled extension, or ``None`` when disabled (``ADAPT_FUSED=0``) or unbuildable."""
    if os.environ.get("ADAPT_FUSED", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="adapt_fused",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffast-math"],
            verbose=False,
        )
    except Exception as e:  # a missing compiler or headers must not break scoring
        logger.warning("adapt: fused CPU kernels unavailable (%s); using the PyTorch path", e)
        return None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels apply: CPU float32 inputs, no autograd, kernels built."""
    return (
        not torch.is_grad_enabled()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and kernels() is not None
    )


def t2i_scores(
    images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, query_unit: torch.Tensor,
    smooth: float,
) -> torch.Tensor:
    """ADAPT-T2I scores ``(n_images, n_captions)``.

    Args:
        images: ``(n_images, n_regions, d)`` regions after normalisation.
        scale, shift: ``(n_captions, d)``: ``gamma + 1`` and ``beta`` of each caption.
        query_unit: ``(n_captions, d)`` unit caption vectors.
        smooth: the fovea's ``lambda``.
    """
    images = images.contiguous()
    return kernels().t2i_scores(
        images, images.amax(1).contiguous(), images.amin(1).contiguous(), scale.contiguous(),
        shift.contiguous(), query_unit.contiguous(), float(smooth),
    )


def i2t_scores(
    words: torch.Tensor, lengths: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    query_unit: torch.Tensor, smooth: float,
) -> torch.Tensor:
    """ADAPT-I2T scores ``(n_images, n_captions)``.

    Args:
        words: ``(n_captions, n_tokens, d)`` words after normalisation; the valid tokens of
            caption ``c`` are ``words[c, :lengths[c]]``.
        lengths: ``(n_captions,)`` valid token counts (at least 1).
        scale, shift: ``(n_images, d)``: ``gamma + 1`` and ``beta`` of each image.
        query_unit: ``(n_images, d)`` unit image vectors.
        smooth: the fovea's ``lambda``.
    """
    words = words.contiguous()
    valid = torch.arange(words.shape[1])[None, :, None] < lengths[:, None, None]
    word_max = words.masked_fill(~valid, float("-inf")).amax(1)
    word_min = words.masked_fill(~valid, float("inf")).amin(1)
    return kernels().i2t_scores(
        words, lengths.to(torch.long).contiguous(), word_max.contiguous(), word_min.contiguous(),
        scale.contiguous(), shift.contiguous(), query_unit.contiguous(), float(smooth),
    )
