"""Building an extractor by name, or rebuilding exactly the one a checkpoint's identity names."""

from __future__ import annotations

from typing import Any

from adapt.regions.base import RegionExtractor
from adapt.regions.bottom_up import BottomUpAttentionExtractor
from adapt.regions.faster_rcnn import FasterRcnnExtractor
from adapt.regions.identity import check_extractor
from adapt.regions.ssd import SsdEfficientNetExtractor

DEFAULT_EXTRACTOR = SsdEfficientNetExtractor.name
BACKENDS: dict[str, type[RegionExtractor]] = {
    backend.name: backend for backend in (SsdEfficientNetExtractor, FasterRcnnExtractor, BottomUpAttentionExtractor)
}


def build_extractor(identity_or_name: dict[str, Any] | str = DEFAULT_EXTRACTOR, allow_mismatch: bool = False,
                    **kwargs: Any) -> RegionExtractor:
    """A region extractor from its name, or from an identity (e.g. a checkpoint's ``config.extractor``).

    Args:
        identity_or_name: a backend name (:data:`BACKENDS`: ``"ssd-mobilenet-v2+efficientnet-lite0"``,
            ``"faster-rcnn-r50-fpn"``, ``"bottom-up-attention"``) or an identity dict as :attr:`RegionExtractor.identity` returns.
        allow_mismatch: for an identity, warn instead of raising when the rebuilt extractor differs.
        kwargs: constructor arguments of the backend (e.g. ``device``, or ``weights`` pointing at a
            local copy of the weights an identity names); they override the identity's values.

    Raises:
        ValueError: unknown backend name or an incomplete identity.
        ExtractorMismatchError: the rebuilt extractor does not match the identity (e.g. other weights).
    """
    identity = identity_or_name if isinstance(identity_or_name, dict) else None
    name = identity.get("name") if identity is not None else identity_or_name
    if name not in BACKENDS:
        raise ValueError(f"unknown region extractor {name!r}; known: {sorted(BACKENDS)}")
    backend = BACKENDS[name]
    if identity is None:
        return backend(**kwargs)
    try:
        rebuilt = backend.kwargs_from_identity(identity)
    except KeyError as e:
        raise ValueError(f"the extractor identity lacks the field {e}; is it a RegionExtractor.identity?") from e
    extractor = backend(**{**rebuilt, **kwargs})
    check_extractor(identity, extractor.identity, allow_mismatch=allow_mismatch)
    return extractor
