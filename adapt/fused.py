"""The fused CPU kernels of ``csrc/fused.cpp``: ADAPT scores without materialising adapted tensors.

Both directions are differentiable: :class:`T2IScores` and :class:`I2TScores` pair a forward
kernel with a backward kernel, so inference and training use them. They take float32 or float64
CPU tensors. If the kernels cannot be built, :func:`kernels` returns ``None`` (with a warning) and
:mod:`adapt.similarity` keeps its plain PyTorch path, which computes the same scores.

Building (once per machine type) happens ahead of time with
``python -m adapt.build_kernels``, or else on first use; :func:`warm_up` starts it in the
background, as the app does at start-up. The build targets the instruction set that torch detects
at run time (:func:`compile_flags`): AVX2 + FMA where the CPU has them, else the compiler's
portable baseline, with ``-O3 -ffast-math -fopenmp-simd`` so the exponentials vectorise.
``ADAPT_FUSED_MARCH`` names a ``-march`` instead (e.g. ``native``). Each build lives in its own
folder under ``TORCH_EXTENSIONS_DIR`` (torch's default cache otherwise), named by a hash of the
source, the compiler, the flags, torch and Python (and for ``-march=native`` the CPU's feature
flags), so a cache shared by several machines gives each the build its CPU can run.
``ADAPT_FUSED=0`` switches the kernels off.

Why not ``-march=native``: besides tying a build to one CPU, it is slower where the compiler
misjudges the CPU (GCC 12 takes some AMD EPYC virtual machines for Zen 1 and prefers 128-bit
vectors there, where ``-mavx2 -mfma`` uses 256-bit ones).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from adapt.io import atomic_write

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "fused.cpp"
_BUILD_LOCK = threading.Lock()  # the app's warm-up thread and a first request may race


def compile_flags() -> list[str]:
    """The C++ flags of the build for this CPU.

    ``-mavx2 -mfma`` where torch's run-time dispatch finds AVX2 (which it grants only with FMA),
    nothing for the compiler's baseline elsewhere (SSE2 on x86-64, NEON on ARM64), or
    ``-march=$ADAPT_FUSED_MARCH``. ``-fopenmp-simd`` honours the ``omp simd`` pragmas: without it
    GCC does not vectorise the backward's loops (too many possible aliases).
    """
    march = os.environ.get("ADAPT_FUSED_MARCH")
    if march:
        target = [f"-march={march}"]
    else:
        target = ["-mavx2", "-mfma"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
    return ["-O3", *target, "-ffast-math", "-fopenmp-simd"]


def cpu_instruction_set() -> str:
    """What ``-march=native`` compiles for on this machine: the CPU's feature flags as Linux lists
    them (``flags`` on x86, ``Features`` on ARM), else the processor name and torch's capability.
    Part of the build folder's name for ``ADAPT_FUSED_MARCH=native`` only."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return f"{platform.machine()}: {' '.join(sorted(value.split()))}"
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {torch.backends.cpu.get_cpu_capability()}"


def build_directory() -> Path:
    """The folder of this machine's build: ``TORCH_EXTENSIONS_DIR`` (or torch's default cache)
    ``/adapt_fused_<hash>``, the hash covering what makes a build reusable: the source, the
    compiler (``CXX``), the flags, torch, Python and, for ``-march=native``, the CPU."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _import_cpp_extension().get_default_build_root()
    flags = compile_flags()
    key = "\n".join([_SOURCE.read_text(), os.environ.get("CXX", "c++"), *flags, torch.__version__,
                     sys.version, cpu_instruction_set() if "-march=native" in flags else ""])
    return Path(root) / f"adapt_fused_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _import_cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, without the "No CUDA runtime is found" warning a CUDA build
    of torch logs on import where there is no GPU: the kernels are CPU-only, so it only confuses.
    The filter is removed afterwards; torch's loggers are otherwise left as they are."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")

    def no_cuda_note(record: logging.LogRecord) -> bool:
        return "No CUDA runtime" not in record.getMessage()

    torch_logger.addFilter(no_cuda_note)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        torch_logger.removeFilter(no_cuda_note)
    return cpp_extension


def _import_built(path: Path) -> ModuleType:
    """Import a finished build directly: no compiler or ninja needed where one was built before."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _load() -> ModuleType | None:
    folder = build_directory()
    built = folder / (folder.name + (".pyd" if sys.platform == "win32" else ".so"))
    if built.is_file():
        try:
            return _import_built(built)
        except ImportError as e:
            logger.warning("adapt: cannot load the fused CPU kernels in %s (%s); building them again",
                           built, e)
    logger.warning("adapt: building the fused CPU kernels, about a minute, once (into %s; "
                   "python -m adapt.build_kernels does it ahead of time)", folder)
    try:
        work = folder / "build"
        work.mkdir(parents=True, exist_ok=True)
        module = _import_cpp_extension().load(name=folder.name, sources=[str(_SOURCE)],
                                              build_directory=str(work), extra_cflags=compile_flags(),
                                              verbose=False)
    except Exception as e:  # a missing compiler or headers must not break scoring
        logger.warning("adapt: fused CPU kernels unavailable (%s); using the PyTorch path, which is "
                       "slower on CPU", e)
        return None
    # Published whole: a process that finds it never reads a half-written file.
    atomic_write(built, lambda temporary: shutil.copyfile(module.__file__, temporary))
    return module


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled extension (built or loaded on the first call), or ``None`` when disabled
    (``ADAPT_FUSED=0``) or unbuildable."""
    if os.environ.get("ADAPT_FUSED", "1") == "0":
        return None
    with _BUILD_LOCK:
        return _load()


def warm_up() -> threading.Thread:
    """Build or load the kernels and run both once on tiny inputs, in a background thread (which
    is returned), so that the first scoring call does not wait for them."""

    def run() -> None:
        if kernels() is None:
            return
        x = torch.ones(1, 2, 4)
        with torch.no_grad():
            t2i_scores(x, x[0], x[0], x[0], 10.0)
            i2t_scores(x, torch.tensor([2]), x[0], x[0], x[0], 10.0)

    thread = threading.Thread(target=run, name="adapt-fused-warm-up", daemon=True)
    thread.start()
    return thread


def _built() -> ModuleType:
    module = kernels()
    if module is None:
        raise RuntimeError("adapt: the fused CPU kernels are unavailable (ADAPT_FUSED=0 or no "
                           "compiler); check fused.usable() before calling them")
    return module


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels apply to ``tensors``: CPU tensors of one dtype, float32 or
    float64, and the extension built."""
    dtypes = {t.dtype for t in tensors}
    return (
        all(t.device.type == "cpu" for t in tensors)
        and len(dtypes) == 1
        and dtypes <= {torch.float32, torch.float64}
        and kernels() is not None
    )


class _FusedScores(torch.autograd.Function):
    """What both fused Functions share, each differentiable once: the forward saves only the
    kernel's inputs and scores; the backward kernel recomputes each pair's fovea, one pair at a
    time, so training memory stays that of the inputs, and skips pairs with a zero incoming
    gradient (most of them under a hinge loss late in training)."""

    @staticmethod
    def score(ctx: torch.autograd.function.FunctionCtx, kernel: str, inputs: tuple[torch.Tensor, ...],
              smooth: float, with_lengths: bool) -> torch.Tensor:
        """The forward: keep the kernel's inputs for the backward, score. ``with_lengths``: the
        second argument of ``apply`` is the captions' lengths, which take no gradient."""
        ctx.save_for_backward(*inputs)
        ctx.kernel, ctx.smooth, ctx.with_lengths = kernel, smooth, with_lengths
        return getattr(_built(), kernel)(*inputs, smooth)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_scores: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        # The kernel gives [grad_locals, grad_scale, grad_shift, grad_query_unit].
        grad_locals, *grads = getattr(_built(), ctx.kernel + "_backward")(
            *ctx.saved_tensors, ctx.smooth, grad_scores.contiguous())
        lengths = (None,) if ctx.with_lengths else ()
        return (grad_locals, *lengths, *grads, None)  # lengths and smooth get none


class T2IScores(_FusedScores):
    """Fused ADAPT-T2I scores, differentiable once (arguments as :func:`t2i_scores`)."""

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
        return _FusedScores.score(ctx, "t2i_scores", inputs, smooth, with_lengths=False)


class I2TScores(_FusedScores):
    """Fused ADAPT-I2T scores, differentiable once (arguments as :func:`i2t_scores`).

    The max over tokens sends each channel's gradient to its first maximal token; padding gets none.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, words: torch.Tensor, lengths: torch.Tensor,
        scale: torch.Tensor, shift: torch.Tensor, query_unit: torch.Tensor, smooth: float,
    ) -> torch.Tensor:
        words = words.contiguous()
        # The extremes over the valid tokens only stabilise the exponentials: no gradient.
        valid = torch.arange(words.shape[1])[None, :, None] < lengths[:, None, None]
        inputs = (words, lengths.to(torch.long).contiguous(),
                  words.masked_fill(~valid, float("-inf")).amax(1).contiguous(),
                  words.masked_fill(~valid, float("inf")).amin(1).contiguous(),
                  scale.contiguous(), shift.contiguous(), query_unit.contiguous())
        return _FusedScores.score(ctx, "i2t_scores", inputs, smooth, with_lengths=True)


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
    """ADAPT-I2T scores ``(n_images, n_captions)``, differentiable in ``words``, ``scale``,
    ``shift`` and ``query_unit``.

    Args:
        words: ``(n_captions, n_tokens, d)`` words after normalisation; the valid tokens of
            caption ``c`` are ``words[c, :lengths[c]]``.
        lengths: ``(n_captions,)`` valid token counts (at least 1).
        scale, shift: ``(n_images, d)``: ``gamma + 1`` and ``beta`` of each image.
        query_unit: ``(n_images, d)`` unit image vectors.
        smooth: the fovea's ``lambda``.
    """
    return I2TScores.apply(words, lengths, scale, shift, query_unit, float(smooth))
