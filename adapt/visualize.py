"""Drawing where a caption's fovea looked: region weights as light on the image, top boxes outlined."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from adapt.regions import Regions

_OUTLINE = (255, 196, 0)
_DIM = 0.3  # brightness of the least attended pixels


def draw_attention(
    image: Image.Image, regions: Regions, weights: np.ndarray | None, top: int = 3,
    all_boxes: bool = False, max_side: int = 1024,
) -> Image.Image:
    """The image lit by the fovea weights of its regions, with the ``top`` regions outlined.

    A pixel's light is the summed weight of the regions covering it, scaled so the brightest pixel
    keeps its colour and the least attended are dimmed to 30 %.

    Args:
        image: the RGB image the regions were extracted from.
        regions: its regions (boxes in its pixels).
        weights: ``(k,)`` fovea weight of each region, or ``None`` to draw the boxes only.
        top: how many of the most attended regions to outline and label with their share.
        all_boxes: also outline every detected (non-fill) region with its detector label.
        max_side: the drawing is downscaled to at most this many pixels per side.
    """
    scale = min(1.0, max_side / max(image.size))
    canvas = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    boxes = np.asarray(regions.boxes, dtype=np.float64) * scale
    if weights is not None:
        light = np.zeros((canvas.height, canvas.width), dtype=np.float64)
        for (x1, y1, x2, y2), w in zip(boxes.round().astype(int), weights):
            light[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] += w
        light = (light - light.min()) / max(light.max() - light.min(), 1e-12)
        pixels = np.asarray(canvas, dtype=np.float64) * (_DIM + (1 - _DIM) * light[..., None])
        canvas = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, canvas.width // 45))
    if all_boxes:
        for box, label, fill in zip(boxes, regions.labels, regions.is_fill):
            if not fill:
                draw.rectangle(box.tolist(), outline=(120, 200, 255), width=1)
                draw.text((box[0] + 3, box[1] + 2), label, fill=(120, 200, 255), font=font)
    if weights is not None:
        for i in np.argsort(-weights)[:top]:
            x1, y1, x2, y2 = boxes[i].tolist()
            draw.rectangle((x1, y1, x2, y2), outline=_OUTLINE, width=max(2, canvas.width // 300))
            label = f"{regions.labels[i] or 'region'} {100 * weights[i]:.0f}%"
            left, top_, right, bottom = draw.textbbox((x1 + 3, y1 + 2), label, font=font)
            draw.rectangle((left - 2, top_ - 1, right + 2, bottom + 1), fill=(0, 0, 0))
            draw.text((x1 + 3, y1 + 2), label, fill=_OUTLINE, font=font)
    return canvas
