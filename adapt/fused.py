"""The fused CPU kernels of ``csrc/fused.cpp``: ADAPT scores without materialising adapted tensors.

The C++ extension is compiled on first use (about a minute, cached by torch in
``TORCH_EXTENSIONS_DIR``) with ``-O3 -march=native -ffast-math -fopenmp-simd`` so the exponentials
vectorise. If no compiler is available, :func:`kernels` returns ``None`` and :mod:`adapt.similarity`
keeps its plain PyTorch path, which computes the same scores.

T2I is differentiable: :class:`T2IScores` pairs the forward kernel with a backward kernel, so
training uses it too. I2T is inference-only. Both take float32 or float64 CPU tensors.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "fused.cpp"


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled extension, or ``None`` when disabled (``ADAPT_FUSED=0``) or unbuildable."""
    if os.environ.get("ADAPT_FUSED", "1") == "0":
        return None
    try:
        # A CUDA build of torch on a machine without CUDA warns "No CUDA runtime is found" when this
        # module loads; the kernels are CPU-only, so that warning only confuses users.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        return load(
            name="adapt_fused",
            sources=[str(_SOURCE)],
            # -fopenmp-simd honours the `omp simd` pragmas: without it GCC gives up on the
            # backward's loops (too many possible aliases), which runs 3.7x slower.
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],
            verbose=False,
        )
    except Exception as e:  # a missing compiler or headers must not break scoring
        logger.warning("adapt: fused CPU kernels unavailable (%s); using the PyTorch path", e)
        return None


def _built() -> ModuleType:
    module = kernels()
    if module is None:
        raise RuntimeError("adapt: the fused CPU kernels are unavailable (ADAPT_FUSED=0 or no "
                           "compiler); check fused.usable() before calling them")
    return module


def usable(*tensors: torch.Tensor, differentiable: bool = False) -> bool:
    """Whether the fused kernels apply to ``tensors``.

    They need CPU tensors of one dtype, float32 or float64, and the built extension. Only T2I has a
    backward kernel: its caller passes ``differentiable=True`` and may run under autograd. I2T's
    kernel is inference-only, so by default autograd must be off.
    """
    dtypes = {t.dtype for t in tensors}
    return (
        (differentiable or not torch.is_grad_enabled())
        and all(t.device.type == "cpu" for t in tensors)
        and len(dtypes) == 1
        and dtypes <= {torch.float32, torch.float64}
        and kernels() is not None
    )


class T2IScores(torch.autograd.Function):
    """Fused ADAPT-T2I scores, differentiable once (arguments as :func:`t2i_scores`).

    The forward saves only its inputs; the backward kernel recomputes each pair's fovea, one pair
    at a time, so training memory stays that of the inputs. Pairs with a zero incoming gradient
    (most of them under a hinge loss late in training) are skipped.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, images: torch.Tensor, scale: torch.Tensor,
        shift: torch.Tensor, query_unit: torch.Tensor, smooth: float,
    ) -> torch.Tensor:
        images = images.contiguous()
        # Each channel's extremes over the regions locate its softmax maximum. They only stabilise
        # the exponentials, so they carry no gradient.
        inputs = (images, images.amax(1).contiguous(), images.amin(1).contiguous(),
                  scale.contiguous(), shift.contiguous(), query_unit.contiguous())
        ctx.save_for_backward(*inputs)
        ctx.smooth = smooth
        return _built().t2i_scores(*inputs, smooth)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_scores: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grads = _built().t2i_scores_backward(*ctx.saved_tensors, ctx.smooth,
                                             grad_scores.contiguous())
        return (*grads, None)


def t2i_scores(
    images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, query_unit: torch.Tensor,
    smooth: float,
) -> torch.Tensor:
    """ADAPT-T2I scores ``(n_images, n_captions)``, differentiable in every tensor argument.

    Args:
        images: ``(n_images, n_regions, d)`` regions after normalisation.
        scale, shift: ``(n_captions, d)``: ``gamma + 1`` and ``beta`` of each caption.
        query_unit: ``(n_captions, d)`` unit caption vectors.
        smooth: the fovea's ``lambda``.
    """
    return T2IScores.apply(images, scale, shift, query_unit, float(smooth))


def i2t_scores(
    words: torch.Tensor, lengths: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    query_unit: torch.Tensor, smooth: float,
) -> torch.Tensor:
    """ADAPT-I2T scores ``(n_images, n_captions)``; inference only (no backward kernel).

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
    return _built().i2t_scores(
        words, lengths.to(torch.long).contiguous(), word_max.contiguous(), word_min.contiguous(),
        scale.contiguous(), shift.contiguous(), query_unit.contiguous(), float(smooth),
    )
