"""Shared test set-up, and the helpers more than one test module uses."""

import os

# OpenMP threads that spin while waiting make torch several times slower when the cores are shared
# (measured: region tests 209 s instead of 55 s on a busy 2-core machine). Must be set before torch
# loads, which is why it lives here, the first module pytest imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from training.synthetic import concept_images, concept_prototypes  # noqa: E402


def concept_data(n_images: int, n_concepts: int = 12, dim: int = 32, n_regions: int = 8,
                 seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Images ``(n_images, n_regions, dim)`` whose regions are noisy prototypes of 3 concepts, and per
    image a caption naming the concepts ("thing3 thing7 thing0"); see :mod:`training.synthetic`."""
    images = concept_images(n_images, concept_prototypes(n_concepts, dim), n_regions, seed)
    return torch.from_numpy(images.features), images.captions
