"""Where torch work runs by default: shared by the model, the region extractors and the CLIs."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
