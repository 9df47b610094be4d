"""What every region extractor shares: the :class:`Regions` result, box selection with
deterministic fills, RoI pooling, box geometry, and the extractor identity (its check is
:mod:`adapt.regions.identity`).

A COCO backend derives from :class:`PooledRegionExtractor` and only implements its ``_detect``
(detections + one backbone feature map per image) and ``_backend_identity``; everything that
decides which boxes become regions and how they turn into vectors lives here, so those backends
behave alike. A detector whose published features are defined by their own selection and per-box
head (bottom-up attention, ``bottom_up.py``) derives from :class:`RegionExtractor` and implements
``_extract_loaded`` itself, building its result with the same ``_build_regions``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes, roi_align

from adapt.device import pick_device
from adapt.regions.coco_names import coco_name
from adapt.regions.identity import IDENTITY_FORMAT
from adapt.regions.image import ImageSource, load_image, shrink_to_max_side
from adapt.regions.scene import SCENE_DIM, SceneClassifier

DEFAULT_NUM_REGIONS = 36
GEOMETRY_DIM = 5
# Detector class scores appended with ``with_labels``: one slot per COCO category id 1-90.
LABEL_DIM = 90
FILL_LABEL = ""
# Images are first shrunk to this longest side: every backend works at a lower resolution anyway,
# and it bounds memory and time for huge (up to max_pixels) inputs. Boxes are mapped back.
WORKING_MAX_SIDE = 2048
# RoI-align to 2x2 bins with torchvision's adaptive sampling (about one bilinear sample per feature-map
# cell), then the mean: the box's average feature. Within 0.999 cosine of 7x7 bins with 2x2 samples
# each, which costs about 4x more.
ROI_OUTPUT_SIZE = 2
ROI_SAMPLING_RATIO = 0


@dataclass(frozen=True)
class Regions:
    """The ``k`` regions of one image; real detections first (by decreasing score), then fills.

    Attributes:
        boxes: (k, 4) float32 ``x1, y1, x2, y2`` in pixels of the loaded image (EXIF-rotated,
            original resolution), inside ``[0, width] x [0, height]``.
        features: (k, D) float32 region features (D = the extractor's ``feature_dim``).
        labels: k detector class names; :data:`FILL_LABEL` for fills.
        scores: (k,) float32 detector scores; 0 for fills.
        is_fill: (k,) bool, True for boxes added because the detector found fewer than ``k``.
        image_size: ``(width, height)`` of the loaded image.
    """

    boxes: np.ndarray
    features: np.ndarray
    labels: list[str]
    scores: np.ndarray
    is_fill: np.ndarray
    image_size: tuple[int, int]


@dataclass
class Detections:
    """A backend's raw output for one (working-size) image.

    Attributes:
        boxes: (n, 4) float boxes in working-image pixels.
        scores: (n,) detector scores.
        class_ids: (n,) int64 COCO category ids.
        feature_map: (C, h, w) backbone feature map of the whole image.
        feature_scale: feature-map cells per working-image pixel, ``(x, y)``.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    class_ids: torch.Tensor
    feature_map: torch.Tensor
    feature_scale: tuple[float, float]


class RegionExtractor(ABC):
    """Turns images into ``k`` boxes with one feature vector each (see :class:`Regions`).

    Subclasses set :attr:`name` and :attr:`backbone_dim` and implement :meth:`_extract_loaded`
    and :meth:`_backend_identity` (or derive from :class:`PooledRegionExtractor`).

    Args:
        num_regions: ``k``, the number of regions per image (36 in the paper).
        with_geometry: append each box's normalised geometry ``(x1/W, y1/H, x2/W, y2/H, area
            fraction)`` to its feature (the last 5 dimensions).
        with_labels: append the detector's class scores (:data:`LABEL_DIM` slots, COCO ids 1-90):
            a detection's score in its class's slot; the whole-image region holds, per class, the
            best score among the image's kept detections; fills hold zeros. They come right after
            the backbone dimensions.
        with_scene: append the whole image's ImageNet class probabilities (:data:`SCENE_DIM`
            slots, :class:`~adapt.regions.scene.SceneClassifier`), the same for every region of an
            image, after the labels: ``feature_dim = backbone_dim (+ 90) (+ 1000) (+ 5)``.
        whole_image: make the first region the whole image (then up to ``num_regions - 1``
            detections, then fills): the whole-image view carries the scene's context.
        score_threshold: detections scoring below this are dropped before NMS.
        nms_iou: IoU above which class-agnostic NMS drops the lower-scoring box.
        max_pixels: refuse larger images (see :func:`adapt.regions.load_image`).
        device: where the torch models run; CUDA when available by default.
    """

    name: ClassVar[str]
    backbone_dim: ClassVar[int]

    def __init__(
        self,
        *,
        num_regions: int,
        with_geometry: bool,
        score_threshold: float,
        nms_iou: float,
        max_pixels: int,
        device: torch.device | str | None,
        with_labels: bool = False,
        with_scene: bool = False,
        whole_image: bool = False,
    ) -> None:
        if num_regions < 1:
            raise ValueError(f"num_regions must be at least 1, got {num_regions}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        if not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must lie in (0, 1], got {nms_iou}")
        self.num_regions = int(num_regions)
        self.with_geometry = bool(with_geometry)
        self.with_labels = bool(with_labels)
        self.scene = SceneClassifier() if with_scene else None
        self.whole_image = bool(whole_image)
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_pixels = int(max_pixels)
        self.device = torch.device(device) if device is not None else pick_device()

    @property
    def feature_dim(self) -> int:
        """Size D of one region feature."""
        return (self.backbone_dim + (LABEL_DIM if self.with_labels else 0) + (SCENE_DIM if self.scene is not None else 0)
                + (GEOMETRY_DIM if self.with_geometry else 0))

    @property
    def regions_per_image(self) -> tuple[int, int]:
        """The fewest and the most regions an image gets: ``(num_regions, num_regions)``, since
        fills complete every image; a variable count needs consumers that accept one."""
        return self.num_regions, self.num_regions

    @property
    def identity(self) -> dict[str, Any]:
        """A JSON-able description of everything that shapes the features (see :func:`check_extractor`)."""
        # These options appear only when on, so identities written before they existed still match.
        options: dict[str, Any] = {"with_labels": True} if self.with_labels else {}
        if self.scene is not None:
            options["with_scene"] = self.scene.identity
        selection = {"whole_image": True} if self.whole_image else {}
        return {
            "name": self.name,
            "format": IDENTITY_FORMAT,
            "num_regions": self.num_regions,
            "feature_dim": self.feature_dim,
            "with_geometry": self.with_geometry,
            **options,
            "selection": {
                "score_threshold": self.score_threshold,
                "nms_iou": self.nms_iou,
                **selection,
                "fill": "whole image, then 2x2, 3x3, ... grids",
            },
            "pooling": {"roi_align": ROI_OUTPUT_SIZE, "sampling_ratio": ROI_SAMPLING_RATIO, "reduce": "mean"},
            "working_max_side": WORKING_MAX_SIDE,
            **self._backend_identity(),
        }

    @classmethod
    def kwargs_from_identity(cls, identity: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments rebuilding the extractor that ``identity`` describes.

        Raises:
            KeyError: ``identity`` lacks a field.
        """
        selection = identity["selection"]
        return {"num_regions": identity["num_regions"], "with_geometry": identity["with_geometry"],
                "with_labels": identity.get("with_labels", False),
                "with_scene": "with_scene" in identity,
                "whole_image": selection.get("whole_image", False),
                "score_threshold": selection["score_threshold"], "nms_iou": selection["nms_iou"]}

    def scene_probabilities(self, regions: Regions) -> np.ndarray | None:
        """The whole image's ImageNet probabilities that ``with_scene`` appended to every region,
        read back from the first region's features: ``(1000,)`` float32 in the order of
        :func:`~adapt.regions.scene.scene_classes`; ``None`` for an extractor without the scene
        block, or regions whose features are not this extractor's (a gallery index keeps boxes only).
        """
        if self.scene is None or regions.features.ndim != 2 or regions.features.shape[1] != self.feature_dim:
            return None
        start = self.backbone_dim + (LABEL_DIM if self.with_labels else 0)
        return regions.features[0, start:start + SCENE_DIM]

    def extract(self, image: ImageSource) -> Regions:
        """Regions of one image (a path, PIL image or numpy array; see :func:`load_image`).

        Raises:
            ImageError: the input is not a usable image.
        """
        return self.extract_batch([image])[0]

    def extract_batch(self, images: Sequence[ImageSource], batch_size: int = 8) -> list[Regions]:
        """Regions of many images, run through the models ``batch_size`` images at a time.

        Raises:
            ImageError: one of the inputs is not a usable image (load images with
                :func:`load_image` first to skip bad ones instead).
        """
        results: list[Regions] = []
        for start in range(0, len(images), batch_size):
            loaded = [load_image(src, self.max_pixels) for src in images[start:start + batch_size]]
            results.extend(self._extract_loaded(loaded))
        return results

    @abstractmethod
    def _extract_loaded(self, images: list[Image.Image]) -> list[Regions]:
        """The regions of each loaded RGB image (original size)."""

    @abstractmethod
    def _backend_identity(self) -> dict[str, Any]:
        """Identity fields of the backend: at least ``weights`` and ``preprocessing``."""

    def _build_regions(self, boxes: torch.Tensor, boxes_size: tuple[int, int], features: torch.Tensor,
                       labels: list[str], scores: torch.Tensor, n_whole: int, image_size: tuple[int, int]) -> Regions:
        """:class:`Regions` from the selected boxes: the whole image first when ``n_whole`` is 1, then
        the detections, then fills; appends the box geometry ``with_geometry``.

        Args:
            boxes: (k, 4) boxes in pixels of an image of ``boxes_size`` ``(w, h)`` (a resized copy).
            features: (k, C) float32 region features, before the geometry.
            labels: the n detections' class names; scores: their (n,) scores.
            n_whole: 1 when the first box is the whole image, else 0.
            image_size: ``(width, height)`` of the loaded image, which the boxes are mapped to.
        """
        (width, height), (boxes_w, boxes_h) = image_size, boxes_size
        n_fill = len(boxes) - n_whole - len(labels)
        to_image = torch.tensor([width / boxes_w, height / boxes_h] * 2)
        image_boxes = clip_boxes_to_image(boxes * to_image, (height, width))
        if self.with_geometry:
            features = torch.cat([features, box_geometry(image_boxes, width, height)], dim=1)
        return Regions(
            boxes=image_boxes.numpy().astype(np.float32),
            features=features.numpy().astype(np.float32),
            labels=[FILL_LABEL] * n_whole + labels + [FILL_LABEL] * n_fill,
            scores=torch.cat([torch.zeros(n_whole), scores, torch.zeros(n_fill)]).numpy().astype(np.float32),
            is_fill=np.array([True] * n_whole + [False] * len(labels) + [True] * n_fill),
            image_size=(width, height),
        )


class PooledRegionExtractor(RegionExtractor):
    """A detector's boxes, each RoI-pooled from one whole-image feature map: the shared selection
    (score floor, class-agnostic NMS, deterministic fills) and pooling of the COCO backends.

    Subclasses implement :meth:`_detect` and :meth:`_backend_identity`.
    """

    @torch.inference_mode()
    def _extract_loaded(self, images: list[Image.Image]) -> list[Regions]:
        working = [shrink_to_max_side(image, WORKING_MAX_SIDE) for image in images]
        detections = self._detect(working)
        return [self._regions(image.size, work, det)
                for image, work, det in zip(images, working, detections, strict=True)]

    def _regions(self, image_size: tuple[int, int], working: Image.Image, det: Detections) -> Regions:
        work_w, work_h = working.size
        boxes = clip_boxes_to_image(det.boxes.float().cpu(), (work_h, work_w))
        scores = det.scores.float().cpu()
        candidates = torch.nonzero(scores >= self.score_threshold).flatten()
        # A box under one pixel wide or high holds no image content to pool.
        candidates = candidates[remove_small_boxes(boxes[candidates], 1.0)]
        n_whole = int(self.whole_image)
        kept = candidates[nms(boxes[candidates], scores[candidates], self.nms_iou)[: self.num_regions - n_whole]]
        n_fill = self.num_regions - n_whole - len(kept)

        whole = fill_boxes(n_whole, work_w, work_h)
        work_boxes = torch.cat([whole, boxes[kept], fill_boxes(n_fill, work_w, work_h)])
        features = pool_regions(det.feature_map, work_boxes, det.feature_scale)
        class_ids = det.class_ids.cpu()[kept].long()
        if self.with_labels:
            features = torch.cat([features, label_scores(class_ids, scores[kept], n_whole, n_fill)], dim=1)
        if self.scene is not None:
            features = torch.cat([features, torch.from_numpy(self.scene(working)).expand(len(features), -1)], dim=1)
        return self._build_regions(work_boxes, (work_w, work_h), features, [coco_name(int(c)) for c in class_ids],
                                   scores[kept], n_whole, image_size)

    @abstractmethod
    def _detect(self, images: list[Image.Image]) -> list[Detections]:
        """Detections and a whole-image feature map for each RGB image (working size)."""


def fill_boxes(count: int, width: float, height: float) -> torch.Tensor:
    """``count`` deterministic boxes: the whole image, then a 2x2 grid, 3x3, ... (row-major).

    Returns:
        (count, 4) float32 ``x1, y1, x2, y2`` boxes within ``width x height``.
    """
    cells: list[tuple[float, float, float, float]] = []
    grid = 1
    while len(cells) < count:
        cells += [
            (col * width / grid, row * height / grid, (col + 1) * width / grid, (row + 1) * height / grid)
            for row in range(grid)
            for col in range(grid)
        ]
        grid += 1
    return torch.tensor(cells[:count], dtype=torch.float32).reshape(count, 4)


def label_scores(class_ids: torch.Tensor, scores: torch.Tensor, n_whole: int, n_fill: int) -> torch.Tensor:
    """Detector class scores of each region (see ``with_labels`` in :class:`RegionExtractor`).

    Args:
        class_ids: (n,) COCO ids (1-90) of the kept detections; ids outside 1-90 get no slot.
        scores: (n,) their scores.
        n_whole: 1 when a whole-image region comes first (it gets each class's best score), else 0.
        n_fill: fill regions after the detections (all zeros).

    Returns:
        (n_whole + n + n_fill, :data:`LABEL_DIM`) float32.
    """
    detections = torch.zeros(len(class_ids), LABEL_DIM)
    valid = (class_ids >= 1) & (class_ids <= LABEL_DIM)
    rows = torch.arange(len(class_ids))[valid]
    detections[rows, class_ids[valid] - 1] = scores[valid].float()
    whole = detections.amax(dim=0, keepdim=True) if len(class_ids) else torch.zeros(1, LABEL_DIM)
    return torch.cat([whole[:n_whole], detections, torch.zeros(n_fill, LABEL_DIM)])


def pool_regions(feature_map: torch.Tensor, boxes: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """Average feature of each box: RoI-align (see :data:`ROI_OUTPUT_SIZE`), then the mean of its bins.

    Args:
        feature_map: (C, h, w) feature map of the whole image.
        boxes: (k, 4) boxes in image pixels.
        scale: feature-map cells per image pixel, ``(x, y)``.

    Returns:
        (k, C) float32 features on the CPU.
    """
    scale_x, scale_y = scale
    rois = (boxes * torch.tensor([scale_x, scale_y, scale_x, scale_y])).to(feature_map)
    pooled = roi_align(feature_map[None], [rois], output_size=ROI_OUTPUT_SIZE, spatial_scale=1.0,
                       sampling_ratio=ROI_SAMPLING_RATIO, aligned=True)
    return pooled.mean(dim=(2, 3)).float().cpu()


def box_geometry(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Normalised box geometry.

    Args:
        boxes: (k, 4) ``x1, y1, x2, y2`` boxes in pixels of a ``width x height`` image.

    Returns:
        (k, 5) float32 ``x1/W, y1/H, x2/W, y2/H, box area / image area``.
    """
    corners = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
    area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
    return torch.cat([corners, area[:, None]], dim=1)


def fit_size(width: int, height: int, short_side: int, max_side: int, multiple: int = 1) -> tuple[int, int]:
    """The size ``(w, h)`` scaling ``width x height`` to a shorter side of ``short_side`` pixels
    (less if the longer side would pass ``max_side``), rounded to a multiple of ``multiple``."""
    scale = min(short_side / min(width, height), max_side / max(width, height))
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))
