"""The bottom-up-attention network: Faster R-CNN, ResNet-101 C4, Visual Genome (1600 classes, 400
attributes), built from torchvision's ops with the state-dict layout of ``unc-nlp/frcnn-vg-finetuned``.

:mod:`adapt.regions.bottom_up` runs it on images the way the Caffe extractor behind the precomp
files does; its module docstring describes the pipeline.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes, roi_pool
from torchvision.ops.misc import FrozenBatchNorm2d

from adapt.regions.weights import ExtractorError

PUBLISHED_REPO = "unc-nlp/frcnn-vg-finetuned"
PUBLISHED_FILE = "pytorch_model.bin"
NUM_CLASSES = 1600  # Visual Genome objects; the classifier has one more output, background, last
NUM_ATTRIBUTES = 400  # Visual Genome attributes; one more output, "no attribute", last
STAGE_BLOCKS = (3, 4, 23)  # ResNet-101 res2, res3, res4 (res5, the box head, has 3 more)
RES5_BLOCKS = 3
FEATURE_STRIDE = 16  # res4
RPN_CHANNELS = 512
ANCHOR_SIZES = (64, 128, 256, 512)  # Caffe's scales 4, 8, 16, 32 of a 16-px base anchor
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
RPN_PRE_NMS = 6000
RPN_NMS_IOU = 0.7
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Box deltas are clamped so that no side grows more than 1000/16-fold (Faster R-CNN's convention).
DELTA_CLAMP = math.log(1000.0 / 16)
POOLED_SIZE = 14
PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
# Proposals through res5 at once: bounds the head's memory (64 x 2048 x 14 x 14 floats = 100 MB).
HEAD_CHUNK = 64

# ---- the network -------------------------------------------------------------------------------


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by frozen BatchNorm (its ``norm``), the checkpoint's layout."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck as MSRA's Caffe ResNet has it: the stride in the first 1x1 convolution.

    Args:
        in_channels, bottleneck_channels, out_channels: channel counts (e.g. 1024, 256, 1024).
        stride: of the first 1x1 convolution and the projection shortcut.
        dilation: of the 3x3 convolution (2 in the VG box head's res5, which keeps stride 1).
    """

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride=stride) if in_channels != out_channels else None
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=stride)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv2(F.relu(self.conv1(x))))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv3(out) + shortcut)


def resnet_stage(n_blocks: int, in_channels: int, bottleneck_channels: int, out_channels: int,
                 stride: int, dilation: int = 1) -> nn.Sequential:
    """``n_blocks`` bottlenecks; only the first changes the resolution and the channel count."""
    return nn.Sequential(*[
        Bottleneck(in_channels if i == 0 else out_channels, bottleneck_channels, out_channels,
                   stride=stride if i == 0 else 1, dilation=dilation)
        for i in range(n_blocks)
    ])


class Stem(nn.Module):
    """7x7 stride-2 convolution, then Caffe's 3x3 stride-2 max-pool (no padding, rounding up)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, 64, 7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    """ResNet-101 up to res4: ``(n, 3, H, W)`` -> ``(n, 1024, ~H/16, ~W/16)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        self.res2 = resnet_stage(STAGE_BLOCKS[0], 64, 64, 256, stride=1)
        self.res3 = resnet_stage(STAGE_BLOCKS[1], 256, 128, 512, stride=2)
        self.res4 = resnet_stage(STAGE_BLOCKS[2], 512, 256, 1024, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


def cell_anchors(sizes: tuple[int, ...] = ANCHOR_SIZES, ratios: tuple[float, ...] = ANCHOR_RATIOS) -> torch.Tensor:
    """Anchors centred on (0, 0): for each size, each height/width ratio, area ``size**2``.

    Returns:
        (len(sizes) * len(ratios), 4) float32 ``x1, y1, x2, y2``, size-major.
    """
    anchors = []
    for size in sizes:
        for ratio in ratios:
            width = math.sqrt(size**2 / ratio)
            height = ratio * width
            anchors.append([-width / 2, -height / 2, width / 2, height / 2])
    return torch.tensor(anchors, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """The cell anchors, stored in the checkpoint (``cell_anchors.0``), tiled over the res4 grid."""

    def __init__(self) -> None:
        super().__init__()
        self.cell_anchors = nn.ParameterList([nn.Parameter(cell_anchors(), requires_grad=False)])

    def forward(self, height: int, width: int) -> torch.Tensor:
        """Anchors of a ``height x width`` feature map, in input pixels.

        Returns:
            (height * width * A, 4), cell-major (the order of the RPN's flattened outputs).
        """
        base = self.cell_anchors[0]
        ys = torch.arange(height, dtype=base.dtype, device=base.device) * FEATURE_STRIDE
        xs = torch.arange(width, dtype=base.dtype, device=base.device) * FEATURE_STRIDE
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([grid_x, grid_y, grid_x, grid_y], dim=-1).reshape(-1, 1, 4)
        return (shifts + base[None]).reshape(-1, 4)


class RpnHead(nn.Module):
    """3x3 convolution, then per-anchor objectness logits and box deltas."""

    def __init__(self, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1024, RPN_CHANNELS, 3, padding=1)
        self.objectness_logits = nn.Conv2d(RPN_CHANNELS, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(RPN_CHANNELS, num_anchors * 4, 1)

    def forward(self, res4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, 1024, h, w)`` -> logits ``(h * w * A,)`` and deltas ``(h * w * A, 4)``, cell-major."""
        hidden = F.relu(self.conv(res4))
        logits = self.objectness_logits(hidden)[0].permute(1, 2, 0).reshape(-1)
        deltas = self.anchor_deltas(hidden)[0]
        _, height, width = deltas.shape
        deltas = deltas.reshape(-1, 4, height, width).permute(2, 3, 0, 1).reshape(-1, 4)
        return logits, deltas


class RegionProposalNetwork(nn.Module):
    """Proposals of one image: the best anchors by objectness, decoded, clipped, NMS-ed."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator()
        self.rpn_head = RpnHead(len(ANCHOR_SIZES) * len(ANCHOR_RATIOS))

    def forward(self, res4: torch.Tensor, image_size: tuple[int, int], num_proposals: int) -> torch.Tensor:
        """Proposal boxes of one image, best first.

        Args:
            res4: (1, 1024, h, w) feature map.
            image_size: ``(height, width)`` of the network input.
            num_proposals: how many to keep after NMS (300 in the published model).

        Returns:
            (R, 4) boxes in input pixels, ``R <= num_proposals``.
        """
        logits, deltas = self.rpn_head(res4)
        anchors = self.anchor_generator(*res4.shape[-2:])
        best = logits.topk(min(RPN_PRE_NMS, len(logits))).indices
        boxes = clip_boxes_to_image(decode_boxes(deltas[best], anchors[best], RPN_BOX_WEIGHTS), image_size)
        nonempty = remove_small_boxes(boxes, 1e-3)
        boxes, scores = boxes[nonempty], logits[best][nonempty]
        return boxes[nms(boxes, scores, RPN_NMS_IOU)[:num_proposals]]


class BoxPredictor(nn.Module):
    """Class, attribute and class-specific box outputs of the 2048-d box features."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_score = nn.Linear(2048, NUM_CLASSES + 1)
        self.bbox_pred = nn.Linear(2048, NUM_CLASSES * 4)
        self.cls_embedding = nn.Embedding(NUM_CLASSES + 1, 256)
        self.fc_attr = nn.Linear(2048 + 256, 512)
        self.attr_score = nn.Linear(512, NUM_ATTRIBUTES + 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, 2048)`` -> class logits ``(R, 1601)`` and attribute logits ``(R, 401)``.

        The attribute head sees the feature and an embedding of the best class (background included).
        """
        class_logits = self.cls_score(features)
        embedded = self.cls_embedding(class_logits.argmax(dim=1))
        attribute_logits = self.attr_score(F.relu(self.fc_attr(torch.cat([features, embedded], dim=1))))
        return class_logits, attribute_logits

    def class_boxes(self, features: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """Each proposal refined for every class: ``(R, 2048)``, ``(R, 4)`` -> ``(R, 1600, 4)``."""
        deltas = self.bbox_pred(features).reshape(len(features), NUM_CLASSES, 4)
        return decode_boxes(deltas, proposals[:, None], ROI_BOX_WEIGHTS)


class Res5BoxHead(nn.Module):
    """RoI max-pool on res4, res5 at stride 1 with dilation 2, mean over the cells; the predictor."""

    def __init__(self) -> None:
        super().__init__()
        self.res5 = resnet_stage(RES5_BLOCKS, 1024, 512, 2048, stride=1, dilation=2)
        self.box_predictor = BoxPredictor()

    def pool(self, res4: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Features of boxes: ``(1, 1024, h, w)``, ``(k, 4)`` input pixels -> ``(k, 2048)``."""
        chunks = [
            self.res5(roi_pool(res4, [boxes[start:start + HEAD_CHUNK]], POOLED_SIZE, 1.0 / FEATURE_STRIDE))
            .mean(dim=(2, 3))
            for start in range(0, len(boxes), HEAD_CHUNK)
        ]
        return torch.cat(chunks) if chunks else res4.new_zeros(0, 2048)


@dataclass
class BoxHeadOutput:
    """What the network says about one image's proposals.

    Attributes:
        res4: (1, 1024, h, w) backbone map (more boxes can be pooled from it).
        proposals: (R, 4) boxes in input pixels, by decreasing objectness.
        features: (R, 2048) mean-pooled res5 features.
        class_probs: (R, 1601) softmax over the classes, background last.
        attribute_probs: (R, 401) softmax over the attributes, "no attribute" last.
    """

    res4: torch.Tensor
    proposals: torch.Tensor
    features: torch.Tensor
    class_probs: torch.Tensor
    attribute_probs: torch.Tensor


class BottomUpAttentionNet(nn.Module):
    """Faster R-CNN ResNet-101 C4 for Visual Genome; state-dict keys as ``unc-nlp/frcnn-vg-finetuned``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.proposal_generator = RegionProposalNetwork()
        self.roi_heads = Res5BoxHead()

    def forward(self, image: torch.Tensor, num_proposals: int) -> BoxHeadOutput:
        """Proposals of one image and their features and class / attribute probabilities.

        Args:
            image: (1, 3, H, W) network input (see :func:`caffe_input`).
            num_proposals: RPN proposals kept after NMS.
        """
        res4 = self.backbone(image)
        proposals = self.proposal_generator(res4, tuple(image.shape[-2:]), num_proposals)
        features = self.roi_heads.pool(res4, proposals)
        class_logits, attribute_logits = self.roi_heads.box_predictor(features)
        return BoxHeadOutput(res4, proposals, features, class_logits.softmax(dim=1), attribute_logits.softmax(dim=1))


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, float, float, float]) -> torch.Tensor:
    """Boxes moved by Faster R-CNN deltas ``(dx, dy, dw, dh) / weights`` (``dw``, ``dh`` clamped).

    Args:
        deltas: (..., 4).
        boxes: (..., 4) ``x1, y1, x2, y2``, broadcastable to ``deltas``.

    Returns:
        (..., 4) decoded boxes.
    """
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    centre_x, centre_y = boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights
    dx, dy, dw, dh = (deltas / deltas.new_tensor(weights)).unbind(dim=-1)
    x, y = centre_x + dx * widths, centre_y + dy * heights
    half_w, half_h = 0.5 * widths * dw.clamp(max=DELTA_CLAMP).exp(), 0.5 * heights * dh.clamp(max=DELTA_CLAMP).exp()
    return torch.stack([x - half_w, y - half_h, x + half_w, y + half_h], dim=-1)


def load_weights(model: BottomUpAttentionNet, path: Path) -> None:
    """Load a state dict in the layout of ``unc-nlp/frcnn-vg-finetuned`` into ``model`` (its tensors
    are taken over, so ``model`` may live on the meta device).

    Raises:
        ExtractorError: no such file, unreadable, not a state dict, or keys / shapes that do not fit
            (the message names them).
    """
    if not path.is_file():
        raise ExtractorError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ExtractorError(f"{path}: not a readable torch state dict ({type(e).__name__}: {e}); "
                             "is the download complete?") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExtractorError(f"{path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}")
    # The LXMERT demo's loader renames old-style gamma / beta keys; files it reads must read here too.
    # BatchNorm batch counters (absent from frozen-BatchNorm checkpoints) mean nothing at inference.
    state = {key.replace("gamma", "weight").replace("beta", "bias"): value for key, value in state.items()
             if not key.endswith("num_batches_tracked")}
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    problems = _listed("missing keys", sorted(set(expected) - set(state)))
    problems += _listed("unexpected keys", sorted(set(state) - set(expected)))
    problems += _listed("wrong shapes", [f"{key} is {tuple(state[key].shape)} in the file, {expected[key]} in the model"
                                         for key in sorted(set(state) & set(expected))
                                         if tuple(state[key].shape) != expected[key]])
    if problems:
        raise ExtractorError(
            f"{path}: not the bottom-up-attention Faster R-CNN (ResNet-101 C4, {NUM_CLASSES} Visual Genome "
            f"classes, {NUM_ATTRIBUTES} attributes) in the layout of {PUBLISHED_REPO}/{PUBLISHED_FILE}: "
            + "; ".join(problems))
    model.load_state_dict({key: value.float() for key, value in state.items()}, assign=True)


def _listed(what: str, items: list[str], most: int = 5) -> list[str]:
    if not items:
        return []
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return [f"{what}: {', '.join(items[:most])}{more}"]
