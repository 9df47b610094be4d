"""Heavier backend: torchvision Faster R-CNN (ResNet-50-FPN, COCO) boxes + 2048-d ResNet C5 features.

Models trained on paper-style 2048-d region features need a 2048-d extractor: each box is RoI-aligned
on the detector's own ResNet-50 ``layer4`` (C5, stride 32) map and averaged, so one backbone pass
serves both detection and features. Weights come from a local file or a Hub repo (safetensors, or a
torch state dict read with ``weights_only=True``); without any the model runs with seeded random
weights (useful for tests only: its boxes and features mean nothing).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from adapt.regions.base import (
    DEFAULT_NUM_REGIONS,
    Detections,
    PooledRegionExtractor,
    fit_size,
)
from adapt.regions.image import DEFAULT_MAX_PIXELS
from adapt.regions.weights import ExtractorError, locate_weights, source_kwargs, weights_fingerprint

RANDOM_WEIGHTS_SEED = 0
C5_LAYER = "3"  # IntermediateLayerGetter's name for ResNet layer4 in torchvision's FPN backbone


class FasterRcnnExtractor(PooledRegionExtractor):
    """Faster R-CNN R50-FPN detections (91 COCO outputs), C5 features (``feature_dim`` 2048 or 2053).

    Args:
        weights: a local weights file (``.safetensors``, else a torch state dict) with the keys of
            ``torchvision.models.detection.fasterrcnn_resnet50_fpn``; it wins over ``repo_id``, so a
            local copy can stand in for the Hub repo an identity names.
        repo_id, filename, revision, cache_dir, local_files_only: fetch the weights file from the
            Hugging Face Hub (``huggingface_hub.hf_hub_download``).
        num_regions, with_geometry, with_labels, with_scene, whole_image, score_threshold, nms_iou, max_pixels, device: see
            :class:`RegionExtractor` (0.05 is torchvision's default score threshold).
        min_size, max_size: the detector's input resolution (torchvision's 800 / 1333 defaults).
        num_proposals: RPN proposals kept before and after its NMS (torchvision's default 1000); the
            box head runs on each, so this dominates the detector's cost.

    Raises:
        ExtractorError: the weights cannot be found, read, or do not fit the model.
    """

    name = "faster-rcnn-r50-fpn"
    backbone_dim = 2048

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        repo_id: str | None = None,
        filename: str = "model.safetensors",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        num_regions: int = DEFAULT_NUM_REGIONS,
        with_geometry: bool = False,
        with_labels: bool = False,
        with_scene: bool = False,
        whole_image: bool = False,
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        min_size: int = 800,
        max_size: int = 1333,
        num_proposals: int = 1000,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_regions=num_regions, with_geometry=with_geometry, with_labels=with_labels,
                         with_scene=with_scene, whole_image=whole_image, score_threshold=score_threshold,
                         nms_iou=nms_iou, max_pixels=max_pixels, device=device)
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.num_proposals = int(num_proposals)
        weights_file, self.weights_source = locate_weights(weights, repo_id, filename, revision, cache_dir,
                                                           local_files_only)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = fasterrcnn_resnet50_fpn(
                weights=None, weights_backbone=None, min_size=self.min_size, max_size=self.max_size,
                box_score_thresh=self.score_threshold, rpn_pre_nms_top_n_test=self.num_proposals,
                rpn_post_nms_top_n_test=self.num_proposals)
        if weights_file is None:
            self.weights_id = f"random-seed{RANDOM_WEIGHTS_SEED}"
        else:
            _load_weights(model, weights_file)
            self.weights_id = weights_fingerprint(weights_file)
        self.model = model.to(self.device).eval()

    def _backend_identity(self) -> dict[str, Any]:
        return {
            "weights": self.weights_id,
            "weights_source": self.weights_source,
            "preprocessing": {
                "min_size": self.min_size,
                "max_size": self.max_size,
                "num_proposals": self.num_proposals,
                "normalisation": "torchvision GeneralizedRCNNTransform (ImageNet mean/std)",
                "feature_map": "resnet50 layer4 (C5, stride 32)",
            },
        }

    @classmethod
    def kwargs_from_identity(cls, identity: dict[str, Any]) -> dict[str, Any]:
        preprocessing = identity["preprocessing"]
        return {**super().kwargs_from_identity(identity), **source_kwargs(identity),
                "min_size": preprocessing["min_size"], "max_size": preprocessing["max_size"],
                "num_proposals": preprocessing["num_proposals"]}

    def _detect(self, images: list[Image.Image]) -> list[Detections]:
        # Shrink with PIL first: torchvision would otherwise resize a full-size float tensor.
        inputs = [torch.from_numpy(np.array(image.resize(
            fit_size(image.width, image.height, self.min_size, self.max_size), Image.BILINEAR)))
            .permute(2, 0, 1).to(self.device, torch.float32) / 255.0 for image in images]
        batch, _ = self.model.transform(inputs)
        body = self.model.backbone.body(batch.tensors)
        pyramid = self.model.backbone.fpn(body)
        proposals, _ = self.model.rpn(batch, pyramid)
        outputs, _ = self.model.roi_heads(pyramid, proposals, batch.image_sizes)
        c5 = body[C5_LAYER]
        stride = batch.tensors.shape[-1] / c5.shape[-1]
        detections = []
        for image, c5_map, (input_h, input_w), output in zip(images, c5, batch.image_sizes, outputs, strict=True):
            to_image = torch.tensor([image.width / input_w, image.height / input_h] * 2, device=self.device)
            detections.append(Detections(
                boxes=output["boxes"] * to_image, scores=output["scores"], class_ids=output["labels"],
                feature_map=c5_map,
                feature_scale=(input_w / image.width / stride, input_h / image.height / stride),
            ))
        return detections


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load a Faster R-CNN state dict into ``model``, naming any key or shape that does not fit."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, SafetensorError, pickle.UnpicklingError) as e:
        raise ExtractorError(f"{path}: not a readable safetensors file or torch state dict ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExtractorError(f"{path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ExtractorError(f"{path}: weights do not fit fasterrcnn_resnet50_fpn (91 classes): {e}") from e
    # Checkpoints saved with frozen BatchNorm (torchvision's own) carry no batch counters; unused in eval.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ExtractorError(f"{path}: weights do not fit fasterrcnn_resnet50_fpn (91 classes): "
                             f"missing {missing[:5]} ({len(missing)} in all), "
                             f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)")

