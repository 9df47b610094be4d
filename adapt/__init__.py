"""adapt: ADAPT image-text retrieval (Wehrmann, Kolling, Barros, AAAI 2020)."""

from adapt.config import AdaptConfig, ConfigError
from adapt.device import pick_device
from adapt.encoders import TokenBatch, build_vocab, tokenize
from adapt.loss import HingeLoss
from adapt.model import AdaptModel, CheckpointError
from adapt.similarity import Scores

__all__ = [
    "AdaptConfig",
    "AdaptModel",
    "CheckpointError",
    "ConfigError",
    "HingeLoss",
    "Scores",
    "TokenBatch",
    "build_vocab",
    "pick_device",
    "tokenize",
]
