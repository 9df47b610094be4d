"""The paper's region features: bottom-up attention (Anderson et al., CVPR 2018) in plain PyTorch.

ADAPT, SCAN, VSE-infinity and every Flickr30k / COCO "precomp" feature set (36 x 2048 per image)
use one detector: Faster R-CNN, ResNet-101 C4, trained on Visual Genome (1600 object classes, 400
attribute classes). :class:`BottomUpAttentionNet` is that network built from torchvision's ops
(``FrozenBatchNorm2d``, ``roi_pool``, ``nms``), with the state-dict key names and shapes of the
published PyTorch conversion ``unc-nlp/frcnn-vg-finetuned`` (``pytorch_model.bin``, the checkpoint of
transformers' LXMERT demo), so that file loads as it is. detectron2 is not needed (nor installable).

One image, as the Caffe extractor behind the precomp files (``tools/generate_tsv.py``) does it:

1. BGR pixels 0-255 minus the Caffe means, resized bilinearly to a shorter side of 600 px (the
   longer side at most 1000 px).
2. ResNet-101 stem and res2-res4 (stride 16, 1024 channels); Caffe's max-pool (no padding, ceil).
3. RPN: 12 anchors per cell, the 6000 best by objectness, NMS at IoU 0.7, the best 300 proposals.
4. Each proposal: RoI max-pool to 14 x 14 on res4, res5 (stride 1, dilation 2), the mean over the
   14 x 14 cells: the 2048-d feature. From it a 1601-way class softmax (background last), a 401-way
   attribute softmax ("no attribute" last; it sees the best class's embedding) and class-specific
   box deltas.
5. Selection: for each of the 1600 classes, NMS (IoU 0.3) over the proposals scored by that class;
   a proposal's confidence is its best class score among the classes in which it survived. Then the
   36 most confident proposals (SCAN / VSE precomp), or the adaptive rule (the ones at confidence
   >= 0.2, at least 10, at most 100). The boxes are the proposals themselves, not the regressed
   boxes: ``generate_tsv.py`` keeps them, so each box is exactly the region its feature pools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.ops import box_iou

from adapt.regions.base import (
    DEFAULT_NUM_REGIONS,
    WORKING_MAX_SIDE,
    RegionExtractor,
    Regions,
    fill_boxes,
    fit_size,
)
from adapt.regions.bottom_up_net import (
    FEATURE_STRIDE,
    NUM_ATTRIBUTES,
    NUM_CLASSES,
    PIXEL_MEAN_BGR,
    POOLED_SIZE,
    PUBLISHED_FILE,
    PUBLISHED_REPO,
    BottomUpAttentionNet,
    BoxHeadOutput,
    load_weights,
)
from adapt.regions.image import DEFAULT_MAX_PIXELS, shrink_to_max_side
from adapt.regions.weights import ExtractorError, locate_weights, source_kwargs, weights_fingerprint

# An attribute joins the label ("red bus") from this probability on (among the 400 attributes), as
# the bottom-up-attention demos draw them.
ATTRIBUTE_MIN_SCORE = 0.1


def caffe_input(image: Image.Image, short_side: int, max_side: int, device: torch.device) -> torch.Tensor:
    """The network input of an RGB image: BGR 0-255 minus the Caffe means, bilinearly resized.

    Returns:
        (1, 3, h, w) float32, ``(w, h) = fit_size(width, height, short_side, max_side)``.
    """
    width, height = fit_size(image.width, image.height, short_side, max_side)
    bgr = torch.from_numpy(np.array(image)).to(device, torch.float32).flip(-1).permute(2, 0, 1)[None]
    # Bilinear weights sum to one, so subtracting the means after resizing equals Caffe's before.
    resized = F.interpolate(bgr, size=(height, width), mode="bilinear", align_corners=False)
    return resized - resized.new_tensor(PIXEL_MEAN_BGR).view(1, 3, 1, 1)


def per_class_confidence(boxes: torch.Tensor, class_probs: torch.Tensor, nms_iou: float) -> torch.Tensor:
    """Each box's best class score among the classes in which it survives that class's NMS.

    Args:
        boxes: (R, 4) boxes, shared by all classes.
        class_probs: (R, C) class probabilities (background excluded).
        nms_iou: IoU above which a class's NMS drops the lower-scoring box.

    Returns:
        (R,) confidences (0 for a box suppressed in every class).
    """
    # Greedy NMS of all classes at once: the boxes are shared, so one IoU matrix serves every class,
    # and step i visits each class's i-th best box (torchvision's nms: stable descending order,
    # suppress at IoU > nms_iou). 1600 separate nms calls cost ~30x more on CPU.
    n_classes, n_boxes = class_probs.shape[1], len(boxes)
    overlaps = box_iou(boxes, boxes) > nms_iou
    order = class_probs.t().argsort(dim=1, descending=True, stable=True)
    # Flat (class, box) indices: index_select / index_copy_ beat 2-d advanced indexing in the loop.
    flat = (order + n_boxes * torch.arange(n_classes, device=boxes.device)[:, None]).t().contiguous()
    suppressed = torch.zeros(n_classes, n_boxes, dtype=torch.bool, device=boxes.device)
    kept = torch.zeros(n_classes * n_boxes, dtype=torch.bool, device=boxes.device)
    for step in range(n_boxes):
        survives = ~suppressed.view(-1).index_select(0, flat[step])
        kept.index_copy_(0, flat[step], survives)
        suppressed |= overlaps.index_select(0, order[:, step]) & survives[:, None]
    return (class_probs * kept.view(n_classes, n_boxes).t()).amax(dim=1)


def select_regions(confidence: torch.Tensor, min_count: int, max_count: int, threshold: float) -> torch.Tensor:
    """Which boxes become regions, most confident first (``generate_tsv.py``'s rule).

    The boxes at ``confidence >= threshold``, but at least ``min_count`` (the most confident ones,
    whatever their confidence) and at most ``max_count``; fewer only when there are fewer boxes.
    ``min_count == max_count`` gives a fixed count (36 for the precomp files).

    Args:
        confidence: (R,) per-box confidences (see :func:`per_class_confidence`).

    Returns:
        (k,) int64 indices into the boxes.
    """
    order = torch.sort(confidence, descending=True, stable=True).indices
    count = min(max(int((confidence >= threshold).sum()), min_count), max_count)
    return order[:count]


def load_vocabulary(path: str | Path, size: int) -> list[str]:
    """Class names from a bottom-up-attention vocabulary file (``objects_vocab.txt``,
    ``attributes_vocab.txt``): one class a line, synonyms after commas (the first one is used).

    Raises:
        ExtractorError: unreadable file, or not ``size`` names.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ExtractorError(f"{path}: cannot read the vocabulary file ({e})") from e
    names = [line.split(",")[0].strip() for line in lines if line.strip()]
    if len(names) != size:
        raise ExtractorError(f"{path}: {len(names)} names, but the model has {size} classes here; pass "
                             "objects_vocab.txt (1600 lines) and attributes_vocab.txt (400 lines) of bottom-up-attention")
    return names


# ---- the extractor -----------------------------------------------------------------------------


class BottomUpAttentionExtractor(RegionExtractor):
    """Bottom-up-attention regions: the paper's 2048-d features (``feature_dim`` 2048, or 2053).

    Weights: a local ``weights`` file wins; else ``repo_id`` / ``filename`` on the Hugging Face Hub
    (by default the published ``unc-nlp/frcnn-vg-finetuned/pytorch_model.bin``, 250 MB, fetched on
    first use and cached as the Hub caches files). Torch files are read with ``weights_only=True``.

    Labels are ``"attribute object"`` ("red bus"; the attribute only at probability >=
    :data:`ATTRIBUTE_MIN_SCORE`) when the vocabulary files are given, else the class index as text.

    Args:
        weights: a local weights file in the layout of the published checkpoint.
        repo_id, filename, revision, cache_dir, local_files_only: where on the Hub
            (``huggingface_hub.hf_hub_download``).
        objects_vocab, attributes_vocab: bottom-up-attention's ``objects_vocab.txt`` (1600 lines)
            and ``attributes_vocab.txt`` (400 lines), for the labels only.
        num_regions: regions per image (36, as the precomp files), the most in the adaptive rule.
        min_regions: the fewest regions in the adaptive rule (10 with ``num_regions=100``: the
            original extractor's default); ``None``: ``num_regions``, a fixed count.
        score_threshold: the adaptive rule's confidence floor (0.2); unused at a fixed count.
        nms_iou: IoU of the per-class NMS (0.3).
        with_geometry, whole_image, max_pixels, device: see :class:`RegionExtractor`.
        with_labels: not supported (it appends the COCO classes of the other backends).
        with_scene: not supported (this detector's features are its own selection and head's).
        short_side, max_side: the network input size (600 / 1000, the Caffe extractor's).
        num_proposals: RPN proposals kept (300); each costs a res5 pass, so this sets the cost.

    Raises:
        ExtractorError: the weights or vocabularies cannot be found, read, or do not fit.
        ValueError: settings out of range, ``with_labels`` or ``with_scene``.
    """

    name = "bottom-up-attention"
    backbone_dim = 2048

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        repo_id: str = PUBLISHED_REPO,
        filename: str = PUBLISHED_FILE,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        objects_vocab: str | Path | None = None,
        attributes_vocab: str | Path | None = None,
        num_regions: int = DEFAULT_NUM_REGIONS,
        min_regions: int | None = None,
        with_geometry: bool = False,
        with_labels: bool = False,
        with_scene: bool = False,
        whole_image: bool = False,
        score_threshold: float = 0.2,
        nms_iou: float = 0.3,
        short_side: int = 600,
        max_side: int = 1000,
        num_proposals: int = 300,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: torch.device | str | None = None,
    ) -> None:
        if with_labels:
            raise ValueError(f"{self.name}: with_labels appends the 90 COCO class scores of the other backends; this "
                             f"detector's classes are Visual Genome's {NUM_CLASSES} (see Regions.labels)")
        if with_scene:
            raise ValueError(f"{self.name}: with_scene is not supported; its features are defined by its own "
                             "selection and per-box head")
        super().__init__(num_regions=num_regions, with_geometry=with_geometry, whole_image=whole_image,
                         score_threshold=score_threshold, nms_iou=nms_iou, max_pixels=max_pixels, device=device)
        self.min_regions = self.num_regions if min_regions is None else int(min_regions)
        if not 1 <= self.min_regions <= self.num_regions:
            raise ValueError(f"need 1 <= min_regions <= num_regions, got {self.min_regions} and {self.num_regions}")
        if not FEATURE_STRIDE <= short_side <= max_side:
            raise ValueError(f"need {FEATURE_STRIDE} <= short_side <= max_side, got {short_side}, {max_side}")
        if num_proposals < 1:
            raise ValueError(f"num_proposals must be at least 1, got {num_proposals}")
        self.short_side, self.max_side, self.num_proposals = int(short_side), int(max_side), int(num_proposals)
        weights_file, self.weights_source = locate_weights(weights, repo_id, filename, revision, cache_dir,
                                                           local_files_only)
        if weights_file is None:
            raise ValueError(f"{self.name} needs its weights: a local weights file or a Hub repo_id")
        # Built without memory (meta device): the file's tensors become the parameters.
        with torch.device("meta"):
            model = BottomUpAttentionNet()
        load_weights(model, weights_file)
        self.weights_id = weights_fingerprint(weights_file)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.objects = load_vocabulary(objects_vocab, NUM_CLASSES) if objects_vocab else None
        self.attributes = load_vocabulary(attributes_vocab, NUM_ATTRIBUTES) if attributes_vocab else None

    @property
    def regions_per_image(self) -> tuple[int, int]:
        return self.min_regions, self.num_regions

    def _backend_identity(self) -> dict[str, Any]:
        # Replaces the shared "selection" and "pooling" fields: this detector selects and pools its own way.
        whole = {"whole_image": True} if self.whole_image else {}
        return {
            "features": (f"bottom-up attention (Anderson et al. 2018): Faster R-CNN ResNet-101 C4 trained on Visual "
                         f"Genome ({NUM_CLASSES} objects, {NUM_ATTRIBUTES} attributes), mean-pooled res5 per box"),
            "weights": self.weights_id,
            "weights_source": self.weights_source,
            "selection": {
                "score_threshold": self.score_threshold,
                "nms_iou": self.nms_iou,
                "min_regions": self.min_regions,
                **whole,
                "rule": "per-class NMS over the RPN proposals, confidence = best surviving class score, most "
                        "confident first; at least min_regions, at most num_regions, the rest at >= score_threshold",
                "fill": "whole image, then 2x2, 3x3, ... grids (only when there are too few proposals)",
            },
            "pooling": {"roi_pool": POOLED_SIZE, "head": "res5, stride 1, dilation 2", "reduce": "mean"},
            "preprocessing": {
                "short_side": self.short_side,
                "max_side": self.max_side,
                "num_proposals": self.num_proposals,
                "pixel_mean_bgr": list(PIXEL_MEAN_BGR),
                "normalisation": "Caffe: BGR 0-255 minus the pixel means, bilinear resize",
            },
        }

    @classmethod
    def kwargs_from_identity(cls, identity: dict[str, Any]) -> dict[str, Any]:
        preprocessing = identity["preprocessing"]
        return {**super().kwargs_from_identity(identity), **source_kwargs(identity),
                "min_regions": identity["selection"]["min_regions"],
                "short_side": preprocessing["short_side"], "max_side": preprocessing["max_side"],
                "num_proposals": preprocessing["num_proposals"]}

    @torch.inference_mode()
    def _extract_loaded(self, images: list[Image.Image]) -> list[Regions]:
        # One image at a time: batching would pad the smaller images, and padding changes their features.
        return [self._extract_one(image) for image in images]

    def _extract_one(self, image: Image.Image) -> Regions:
        network_input = caffe_input(shrink_to_max_side(image, WORKING_MAX_SIDE), self.short_side, self.max_side, self.device)
        out = self.model(network_input, self.num_proposals)
        input_h, input_w = network_input.shape[-2:]
        n_whole = int(self.whole_image)
        confidence = per_class_confidence(out.proposals, out.class_probs[:, :NUM_CLASSES], self.nms_iou)
        kept = select_regions(confidence, self.min_regions - n_whole, self.num_regions - n_whole, self.score_threshold)
        n_fill = max(0, self.min_regions - n_whole - len(kept))

        extra = fill_boxes(n_whole, input_w, input_h), fill_boxes(n_fill, input_w, input_h)
        whole, fills = (self.model.roi_heads.pool(out.res4, boxes.to(self.device)).float().cpu() for boxes in extra)
        features = torch.cat([whole, out.features[kept].float().cpu(), fills])
        boxes = torch.cat([extra[0], out.proposals[kept].float().cpu(), extra[1]])
        return self._build_regions(boxes, (input_w, input_h), features, self._labels(out, kept),
                                   confidence[kept].float().cpu(), n_whole, image.size)

    def _labels(self, out: BoxHeadOutput, kept: torch.Tensor) -> list[str]:
        object_ids = out.class_probs[kept, :NUM_CLASSES].argmax(dim=1).tolist()
        objects = [self.objects[i] if self.objects else str(i) for i in object_ids]
        if not self.attributes:
            return objects
        # The attribute softmax without its "no attribute" output, as the demos read it.
        real = out.attribute_probs[kept, :NUM_ATTRIBUTES]
        probs, attribute_ids = (real / real.sum(dim=1, keepdim=True)).max(dim=1)
        return [f"{self.attributes[a]} {name}" if p >= ATTRIBUTE_MIN_SCORE else name
                for name, a, p in zip(objects, attribute_ids.tolist(), probs.tolist(), strict=True)]
