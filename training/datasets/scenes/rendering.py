"""Drawing a scene: the background (a cropped, tinted sample photo or a plain colour) and the stamps."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from training.datasets.scenes.inventory import DEFAULT_STAMPS_DIR, Background, Stamp
from training.datasets.scenes.layout import Scene

@cache


def _photo(name: str) -> np.ndarray:
    """A scikit-image sample photo, as float32 in [0, 1] (grey, or RGB)."""
    import skimage.data  # only the drawing needs scikit-image

    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def background_pixels(background: Background, crop: tuple[float, float, float, bool], size: int) -> np.ndarray:
    """The ``size`` square RGB uint8 background: the photo's crop (tinted if grey), or the plain colour."""
    color = np.asarray(background.color, np.float32)
    if background.photo is None:
        return np.broadcast_to(color.astype(np.uint8), (size, size, 3)).copy()
    photo = _photo(background.photo)
    side_fraction, x_fraction, y_fraction, mirrored = crop
    side = max(1, round(side_fraction * min(photo.shape[:2])))
    x, y = round(x_fraction * (photo.shape[1] - side)), round(y_fraction * (photo.shape[0] - side))
    patch = photo[y:y + side, x:x + side]
    if patch.ndim == 2:
        # Grey texture -> the tint at mid grey, brighter and darker around it.
        patch = np.clip(patch[..., None] * 2.0 * color[None, None, :] / 255.0, 0.0, 1.0)
    image = Image.fromarray((patch * 255.0 + 0.5).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else image).copy()


class StampImages:
    """Cropped cut-outs of the stamps, read once each (premultiplied, so resizing keeps edges clean)."""

    def __init__(self, stamps_dir: str | Path = DEFAULT_STAMPS_DIR) -> None:
        self.root = Path(stamps_dir)
        self._images: dict[str, Image.Image] = {}

    def get(self, stamp: Stamp) -> Image.Image:
        """The stamp's cut-out, premultiplied RGBa, cropped to its alpha box."""
        if stamp.path not in self._images:
            with Image.open(self.root / stamp.path) as image:
                self._images[stamp.path] = image.convert("RGBA").crop(stamp.crop).convert("RGBa")
        return self._images[stamp.path]


def render_scene(scene: Scene, size: int, images: StampImages) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene's RGB image and, per placement, its alpha in the image (``size x size`` uint8)."""
    canvas = Image.fromarray(background_pixels(scene.background, scene.crop, size))
    masks = []
    for placement in scene.placements:
        x1, y1, x2, y2 = placement.box
        sprite = images.get(placement.stamp).resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS).convert("RGBA")
        canvas.paste(sprite, (x1, y1), sprite)
        mask = np.zeros((size, size), np.uint8)
        mask[y1:y2, x1:x2] = np.asarray(sprite)[..., 3]
        masks.append(mask)
    return canvas, masks
