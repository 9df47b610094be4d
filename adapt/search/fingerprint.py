"""What a gallery index records about the model whose encoded regions it stores, and how a model
differs from that record (:meth:`adapt.search.GalleryIndex.open` refuses any difference)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from adapt.config import field_differences
from adapt.model import AdaptModel

# Left out of the recorded config: the free-form card, the file format, and the extractor, which
# the index compares on its own with adapt.regions.check_extractor.
IGNORED_CONFIG_FIELDS = ("card", "format", "extractor")


def _field_defaults(config: Any) -> dict[str, Any]:
    """Each field of a config dataclass with its default value."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING}


def _recorded(value: Any) -> Any:
    """A config value as a fingerprint records it: scalars as they are, lists and tables (a
    vocabulary, a concepts table) by their digest."""
    if isinstance(value, (list, dict)):
        return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
    return value


def model_fingerprint(model: AdaptModel) -> dict[str, Any]:
    """What an index records about the model whose encoded regions it stores.

    ``config`` has every field of the architecture (the config without its free-form ``card``, its
    ``format`` and its ``extractor``, which :meth:`adapt.search.GalleryIndex.open` compares with
    :func:`adapt.regions.check_extractor`), field by field, so a difference is named and a field
    added to :class:`~adapt.config.AdaptConfig` later, at its default, changes nothing (see
    :func:`fingerprint_differences`); ``weights_sha256`` covers every tensor of the state dict, so
    a retrained model is told apart too.
    """
    config = {k: _recorded(v) for k, v in model.config.to_dict().items() if k not in IGNORED_CONFIG_FIELDS}
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"config": config, "weights_sha256": weights.hexdigest(), "extractor": model.config.extractor}


def fingerprint_differences(stored: dict[str, Any], model: AdaptModel) -> list[str]:
    """``field: index X, model Y`` for every way ``model`` differs from the ``stored`` fingerprint
    (the extractor aside).

    A config field that only one side records is compared with its default: a field added to the
    config since the index was built matches while the model leaves it at its default.
    """
    current = model_fingerprint(model)
    defaults = {k: _recorded(v) for k, v in _field_defaults(model.config).items()}
    differ = field_differences(stored["config"], current["config"], ("index", "model"), defaults)
    if stored["weights_sha256"] != current["weights_sha256"]:
        differ.append(f"weights_sha256: index {stored['weights_sha256']!r}, model {current['weights_sha256']!r}")
    return differ
