"""Turning whatever a user hands us (a path, a PIL image, a numpy array) into an RGB PIL image.

All image decoding of the project goes through :func:`load_image`, so every odd input (truncated,
empty, 16-bit, CMYK, transparent, EXIF-rotated, gigantic) is handled, or refused with an
:class:`ImageError`, in one place.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

# 12000 x 12000 (144 Mpx, ~0.6 GB decoded) still fits; anything larger is almost surely a
# decompression bomb or a scan that should be downscaled before region extraction.
DEFAULT_MAX_PIXELS = 150_000_000

# Transparent pixels carry arbitrary (often black) colour; composing onto white matches how
# viewers show such images.
_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An input that is not a usable image; the message says why and what to do."""


class ImageTooLarge(ImageError):
    """An image with more pixels than ``max_pixels``, refused before decoding; ``size`` is its
    (width, height), or ``None`` when Pillow refused it first as a possible decompression bomb
    (over twice ``PIL.Image.MAX_IMAGE_PIXELS``). An application words its own advice from these."""

    def __init__(self, message: str, name: str, size: tuple[int, int] | None, max_pixels: int) -> None:
        super().__init__(message)
        self.name, self.size, self.max_pixels = name, size, max_pixels


def shrink_to_max_side(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` downscaled (bilinear, aspect kept) so its longer side is at most ``max_side``;
    the same object when it already fits. The project's one way to make a smaller copy."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: a fast integer pre-reduction, so huge images shrink in well under a second.
    return image.resize(size, Image.BILINEAR, reducing_gap=3.0)


def load_image(
    src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Load ``src`` as an 8-bit RGB PIL image, upright as a viewer shows it.

    Args:
        src: a file path, a PIL image, or a numpy array of shape (H, W), (H, W, 1), (H, W, 3) or
            (H, W, 4) with dtype uint8, uint16 (full 0-65535 range) or float (0-1 range).
        max_pixels: refuse images with more pixels than this (checked before decoding a file,
            so decompression bombs cost nothing).
        max_side: a JPEG file larger than this on its longest side is decoded at a reduced scale
            (1/2, 1/4 or 1/8, the smallest that keeps at least ``max_side``), which costs a fraction
            of the full decode; ``max_pixels`` applies to the reduced size. Other formats and
            ``None`` decode at full size.
        name: what to call the image in error messages (default: the path), e.g. the file name a
            user uploaded rather than a server's temporary path.

    Returns:
        An RGB image (mode ``"RGB"``): EXIF orientation applied, transparency composed onto white,
        grayscale / palette / CMYK / 16-bit converted (``src`` itself when it already is an upright
        RGB PIL image).

    Raises:
        ImageError: missing, empty, truncated, corrupt, too large or unsupported input.
    """
    if isinstance(src, Image.Image):
        image, name = src, name or "image"
        _check_pixels(image, name, max_pixels)
        _decode(image, name)
    elif isinstance(src, np.ndarray):
        image, name = _from_array(src), name or "array"
        _check_pixels(image, name, max_pixels)
    elif isinstance(src, (str, os.PathLike)):
        name = name or str(src)
        image = _open_file(Path(src), max_pixels, max_side, name)
    else:
        raise ImageError(f"cannot read an image from a {type(src).__name__}; pass a path, a PIL image "
                         "or a numpy array")
    return _to_rgb(_upright(image), name)


def _open_file(path: Path, max_pixels: int, max_side: int | None, name: str) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{name}: no such file")
    if not path.is_file():
        raise ImageError(f"{name}: not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes); re-download or re-export the image")
    try:
        # We apply our own, stricter limit below; PIL's warning would only be noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: refused as a possible decompression bomb ({e})", name, None, max_pixels) from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image file Pillow can read (JPEG, PNG, WebP, TIFF, BMP, "
                         "GIF, ...); is it corrupt or another kind of file?") from e
    except OSError as e:
        raise ImageError(f"{name}: truncated or corrupt image file ({e}); re-download or re-export the image") from e
    if max_side is not None and image.format == "JPEG" and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    _check_pixels(image, name, max_pixels)
    _decode(image, name)
    return image


def _decode(image: Image.Image, name: str) -> None:
    """Decode a lazily opened image now, so broken data fails here with a clear message."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: truncated or corrupt image data ({e}); re-download or "
                         "re-export the image") from e


def _upright(image: Image.Image) -> Image.Image:
    """The image rotated / mirrored as its EXIF orientation tag says (viewers show it so)."""
    # exif_transpose copies even untagged images; skip it for them (a copy of a huge image is costly).
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,}; downscale the image first or raise max_pixels", name, (width, height), max_pixels
        )


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(f"array of shape {array.shape} is not an image; expected (H, W), "
                         "(H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"array of shape {array.shape} has no pixels")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ImageError("float arrays must hold finite values in [0, 1]; scale the array or "
                             "convert it to uint8 (0-255)")
        pixels = (array * 255.0).round().astype(np.uint8)
    else:
        raise ImageError(f"array dtype {array.dtype} is not supported; use uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255 (a white image); rescale instead.
        levels = np.asarray(image, dtype=np.float32) / 257.0
        return Image.fromarray(levels.clip(0, 255).round().astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise ImageError(f"{name}: floating-point images (mode F) have no fixed value range; "
                         "convert the image to 8-bit RGB first")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: cannot convert image mode {image.mode} to RGB ({e}); "
                         "re-export the image as 8-bit RGB") from e
