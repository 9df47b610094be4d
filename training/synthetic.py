"""Synthetic "concept" data, and the brief training loop that learns it, for tests and benchmarks.

An image's ``n_regions`` region features are noise, except that ``concepts_per_image`` of them also
carry the prototype of a concept; its caption names those concepts ("thing3 thing7 thing0"). A tiny
ADAPT model learns to retrieve such images within a few hundred steps on a CPU, so a test or a
benchmark can check that training, scoring and search mean something without a real dataset.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from adapt import AdaptModel, HingeLoss


class ConceptImages(NamedTuple):
    """Generated images and what they show.

    Attributes:
        features: ``(n_images, n_regions, dim)`` float32 region features.
        concepts: ``(n_images, concepts_per_image)`` the concept ids each image shows.
        captions: one per image, the names of its concepts in ``concepts`` order, space-separated.
    """

    features: np.ndarray
    concepts: np.ndarray
    captions: list[str]


def concept_prototypes(n_concepts: int, dim: int, seed: int = 99) -> np.ndarray:
    """``(n_concepts, dim)`` float32 standard-normal prototypes, the same for the same seed."""
    return np.random.default_rng(seed).normal(size=(n_concepts, dim)).astype(np.float32)


def concept_images(
    n_images: int,
    prototypes: np.ndarray,
    n_regions: int,
    seed: int | Sequence[int],
    concepts_per_image: int = 3,
    noise: float = 0.5,
    names: Sequence[str] | None = None,
) -> ConceptImages:
    """``n_images`` images of ``concepts_per_image`` different concepts each, in different regions.

    Args:
        n_images: how many.
        prototypes: ``(n_concepts, dim)``, e.g. :func:`concept_prototypes`.
        n_regions: regions per image (at least ``concepts_per_image``).
        seed: of the noise and of the choice of concepts and regions (``numpy.random.default_rng``).
        concepts_per_image: concepts each image shows.
        noise: standard deviation of the noise in every region.
        names: a name per concept for the captions; ``thing0``, ``thing1``, ... by default.
    """
    rng = np.random.default_rng(seed)
    n_concepts, dim = prototypes.shape
    features = rng.normal(scale=noise, size=(n_images, n_regions, dim)).astype(np.float32)
    # A random permutation per row, vectorised: a gallery of a million images is generated in chunks.
    concepts = np.argsort(rng.random((n_images, n_concepts)), axis=1)[:, :concepts_per_image]
    slots = np.argsort(rng.random((n_images, n_regions)), axis=1)[:, :concepts_per_image]
    features[np.arange(n_images)[:, None], slots] += prototypes[concepts]
    names = names if names is not None else [f"thing{c}" for c in range(n_concepts)]
    return ConceptImages(features, concepts, [" ".join(names[c] for c in row) for row in concepts])


def shuffled_batches(features: torch.Tensor, captions: Sequence[str], batch_size: int,
                     epochs: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """``(features (b, n_regions, dim), captions)`` batches of every image once per epoch, in a new
    ``torch.randperm`` order each epoch (drawn when the epoch starts)."""
    for _ in range(epochs):
        for batch in torch.randperm(len(features)).split(batch_size):
            yield features[batch], [captions[i] for i in batch]


def train_briefly(model: AdaptModel, batches: Iterable[tuple[torch.Tensor | np.ndarray, list[str]]],
                  lr: float) -> AdaptModel:
    """Train ``model`` in place, one Adamax step with the hinge loss per batch; returns it.

    Args:
        model: put in training mode, and left in it.
        batches: ``(features (b, n_regions, region_dim), b captions)``, caption ``i`` of image ``i``.
        lr: Adamax's learning rate (constant).
    """
    model.train()
    loss_fn = HingeLoss()
    optimizer = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=lr)
    for features, captions in batches:
        loss = loss_fn(model(torch.as_tensor(features), captions).scores)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
