"""Regions grounded in the concepts that the pretrained networks already know (ConSE).

ConSE (Norouzi et al., "Zero-Shot Learning by Convex Combination of Semantic Embeddings", ICLR
2014) maps an image classifier's output into a text space: the top-``k`` class probabilities weight
the text embeddings of the class names. Here it is applied to every region: the ImageNet head of
the region features' own backbone (EfficientNet-Lite0: global pool + linear 1280 -> 1000) scores
the region's RoI-pooled vector, the detector's COCO class scores (``with_labels`` extractors) add
their names, and the names are embedded by the model's own text transformer. With
``scene_weight`` (extractors built ``with_scene``), every region's ImageNet part is mixed with
that of the whole photo, classified by the stronger EfficientNet-Lite3
(:mod:`adapt.regions.scene`): each region is seen in its scene's context. The region encoder adds
that concept vector to the reference's linear projection (:class:`ConceptRegionEncoder`).

:func:`ground_in_concepts` initialises a fresh model so that, before any training, its T2I score is
the ConSE score: the concept part maps into the latent space as ``[I; -I]`` (so LeakyReLU keeps its
sign information), the text projection does the same, and the linear part starts at zero. Training
then learns what the named concepts miss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from adapt.similarity import masked_mean

if TYPE_CHECKING:
    from adapt.encoders import TransformerTextEncoder

CLASSIFIER_SOURCE = "efficientnet-lite0 ImageNet-1k head"
NAME_BATCH = 256


def default_concepts(top_k: int = 10, scene_weight: float | None = None) -> dict[str, Any]:
    """The ``AdaptConfig.concepts`` of the bundled extractor: 1000 ImageNet classes, 90 COCO slots.

    The ImageNet class names are those torchvision ships in its weights' metadata (no download),
    in the order of EfficientNet-Lite0's classifier. What is embedded for each class is its WordNet
    description as timm ships it ("tabby, tabby cat: a cat with a grey or tawny coat mottled with
    black"): the synonyms and the gloss name what a caption says ("cat") where the class name alone
    ("tabby") does not (``python -m training.real_photos`` measures the difference).

    Args:
        top_k: classes per ConSE vector.
        scene_weight: for features extracted ``with_scene``: the share ``w`` of the whole photo's
            ImageNet concepts in every region's, ``(1 - w) ConSE(region) + w ConSE(scene)``.
            ``None``: features without the scene block.
    """
    from timm.data import ImageNetInfo

    # Imported here: the image side (OpenCV, the detector) is not needed to build or load a model.
    from adapt.regions.base import LABEL_DIM
    from adapt.regions.coco_names import coco_name
    from adapt.regions.scene import scene_classes
    from adapt.regions.ssd import SsdEfficientNetExtractor

    return {
        "classifier": CLASSIFIER_SOURCE,
        "backbone_dim": SsdEfficientNetExtractor.backbone_dim,
        "classes": scene_classes(),
        "descriptions": ImageNetInfo("imagenet-1k").label_descriptions(detailed=True),
        "labels": [coco_name(i) for i in range(1, LABEL_DIM + 1)],
        "top_k": top_k,
        **({} if scene_weight is None else {"scene_weight": float(scene_weight)}),
    }


def conse(probs: torch.Tensor, names: torch.Tensor, top_k: int) -> torch.Tensor:
    """ConSE: the ``top_k`` class probabilities weight the class-name embeddings.

    Args:
        probs: ``(..., n_classes)`` class probabilities.
        names: ``(n_classes, c)`` name embeddings.

    Returns:
        ``(..., c)`` (not normalised).
    """
    top = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    return torch.einsum("...k,...kc->...c", top.values, names[top.indices])


class ConceptRegionEncoder(nn.Module):
    """``l2norm(LeakyReLU(W x + b + W_c ConSE(x)))`` per region (the reference's encoder + concepts).

    A region feature ``x`` is laid out as the extractor writes it: ``backbone_dim`` backbone values,
    then (when ``labels`` is not empty) the detector's class scores, then (with ``scene_weight``)
    the whole image's probabilities over the same ``classes``, then anything else (geometry).

    Args:
        region_dim: input feature size.
        latent_size: joint space size ``d``.
        concepts: ``AdaptConfig.concepts``: ``backbone_dim``, ``classes`` (classifier outputs),
            ``labels`` (detector slots, may be empty), ``top_k`` and optionally ``scene_weight``.
        concept_dim: size of the name embeddings (the text transformer's hidden size).
    """

    def __init__(self, region_dim: int, latent_size: int, concepts: dict[str, Any], concept_dim: int) -> None:
        super().__init__()
        self.backbone_dim = int(concepts["backbone_dim"])
        self.n_labels = len(concepts["labels"])
        self.top_k = int(concepts["top_k"])
        self.scene_weight = float(concepts.get("scene_weight", 0.0))
        self.n_scene = len(concepts["classes"]) if "scene_weight" in concepts else 0
        if not 0.0 <= self.scene_weight <= 1.0:
            raise ValueError(f"scene_weight must lie in [0, 1], got {self.scene_weight}")
        if self.backbone_dim + self.n_labels + self.n_scene > region_dim:
            raise ValueError(f"concepts need {self.backbone_dim} backbone + {self.n_labels} label + {self.n_scene} "
                             f"scene values, but region features are {region_dim}-d")
        self.fc = nn.Linear(region_dim, latent_size)
        nn.init.xavier_uniform_(self.fc.weight)  # as RegionEncoder; ground_in_concepts re-initialises
        nn.init.zeros_(self.fc.bias)
        self.classifier = nn.Linear(self.backbone_dim, len(concepts["classes"])).requires_grad_(False)
        self.class_names = nn.Parameter(torch.zeros(len(concepts["classes"]), concept_dim), requires_grad=False)
        self.label_names = nn.Parameter(torch.zeros(self.n_labels, concept_dim), requires_grad=False)
        self.fc_concepts = nn.Linear(concept_dim, latent_size, bias=False)

    def concept_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """ConSE vector of each region: ``(..., region_dim)`` -> ``(..., concept_dim)``.

        The top-``k`` classifier probabilities weight the class-name embeddings, mixed with the
        scene's by ``scene_weight``; the detector's class scores weight the label-name embeddings.
        """
        probs = torch.softmax(self.classifier(features[..., : self.backbone_dim]), dim=-1)
        concepts = conse(probs, self.class_names, self.top_k)
        labels_end = self.backbone_dim + self.n_labels
        if self.n_scene:
            scene = conse(features[..., labels_end : labels_end + self.n_scene], self.class_names, self.top_k)
            concepts = (1.0 - self.scene_weight) * concepts + self.scene_weight * scene
        if self.n_labels:
            concepts = concepts + features[..., self.backbone_dim : labels_end] @ self.label_names
        return concepts

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(n_images, n_regions, region_dim)`` -> ``(n_images, n_regions, d)``, unit norm rows."""
        latent = self.fc(features) + self.fc_concepts(self.concept_vectors(features))
        return F.normalize(F.leaky_relu(latent, 0.1), dim=-1)


@torch.no_grad()
def embed_names(text_encoder: "TransformerTextEncoder", names: list[str]) -> torch.Tensor:
    """Unit-norm mean-pooled transformer states of each name (sentence-transformers' pooling).

    Returns:
        ``(len(names), hidden_size)`` float32.
    """
    rows = []
    for start in range(0, len(names), NAME_BATCH):
        batch = text_encoder.tokenize(names[start : start + NAME_BATCH])
        hidden = text_encoder.hidden_states(batch)
        rows.append(F.normalize(masked_mean(hidden, batch.mask), dim=-1))
    return torch.cat(rows)


def _plus_minus_identity(latent_size: int, dim: int) -> torch.Tensor:
    """``[I; -I]`` of shape ``(latent_size, dim)``: after LeakyReLU, ``x`` and ``-x`` both survive."""
    if latent_size != 2 * dim:
        raise ValueError(f"grounding in concepts needs latent_size = 2 x {dim} = {2 * dim}, got {latent_size}")
    eye = torch.eye(dim)
    return torch.cat([eye, -eye])


@torch.no_grad()
def ground_in_concepts(encoder: ConceptRegionEncoder, text: "TransformerTextEncoder",
                       concepts: dict[str, Any]) -> None:
    """Fill a fresh model's concept tables and start it at the ConSE score (see the module docstring);
    :class:`~adapt.model.AdaptModel` calls this on the encoders it builds.

    Loads the ImageNet head from the EfficientNet-Lite0 package and embeds every class (its
    ``descriptions`` entry where the table has them, else its name) and label name with the model's
    text transformer.

    Args:
        encoder: the model's region encoder.
        text: the model's text encoder, whose projection starts at ``[I; -I]`` too.
        concepts: the model's ``AdaptConfig.concepts``.
    """
    from adapt.regions.ssd import backbone_state

    state = backbone_state()
    encoder.classifier.weight.copy_(state["_fc.weight"])
    encoder.classifier.bias.copy_(state["_fc.bias"])
    encoder.class_names.copy_(embed_names(text, list(concepts.get("descriptions", concepts["classes"]))))
    if encoder.n_labels:
        encoder.label_names.copy_(embed_names(text, list(concepts["labels"])))
    plus_minus = _plus_minus_identity(encoder.fc_concepts.out_features, encoder.class_names.shape[1])
    encoder.fc_concepts.weight.copy_(plus_minus)
    encoder.fc.weight.zero_()
    text.proj.weight.copy_(plus_minus)
    text.proj.bias.zero_()
