"""The extractor identity's one compatibility rule: a model refuses features from another region
extractor than the one it was trained on (:func:`check_extractor`)."""

from __future__ import annotations

import json
import warnings
from typing import Any

from adapt.config import field_differences

# Bump when the meaning of the features changes, so older checkpoints refuse the new extractor.
IDENTITY_FORMAT = 1
# Identity fields that say where weights were found, not what they are: never compared.
LOCATION_FIELDS = ("weights_source",)
REBUILD_ADVICE = ("Rebuild the extractor the model names with adapt.regions.build_extractor(config.extractor), "
                  "or pass allow_mismatch=True (--allow-extractor-mismatch) to override at your own risk.")


class ExtractorMismatchError(ValueError):
    """A model's training features came from another region extractor than the one at hand."""


def comparable_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The fields of an extractor identity that :func:`check_extractor` compares, dotted: every
    top-level field but :data:`LOCATION_FIELDS`, and in the nested groups every value but text."""
    # A JSON round trip first, so tuples and lists compare equal, as they will after saving.
    flat = _flatten(json.loads(json.dumps(identity)))
    return {key: value for key, value in flat.items()
            if key.split(".")[0] not in LOCATION_FIELDS and ("." not in key or not isinstance(value, str))}


def identity_differences(expected: dict[str, Any], actual: dict[str, Any],
                         names: tuple[str, str] = ("model", "extractor")) -> list[str]:
    """A ``field: <names[0]> has X, <names[1]> has Y`` line for every field in which the
    :func:`comparable_identity` of two identities differ (the rule is :func:`check_extractor`'s)."""
    return field_differences(comparable_identity(expected), comparable_identity(actual),
                             (f"{names[0]} has", f"{names[1]} has"))


def check_extractor(
    model_config_extractor: dict[str, Any] | None,
    identity: dict[str, Any] | None,
    allow_mismatch: bool = False,
    *,
    names: tuple[str, str] = ("model", "extractor"),
    advice: str = REBUILD_ADVICE,
) -> list[str]:
    """Refuse to pair a model with features from another region extractor than it was trained on.

    The one rule for every such check (:class:`~adapt.pipeline.Retriever`, :func:`build_extractor`,
    ``training.extract``, ``training.evaluate``, ``GalleryIndex.open``): two identities match when
    their :func:`comparable_identity` are equal, that is

    - every top-level field is compared, whatever its type: ``name``, ``format``, ``weights``,
      ``num_regions``, ``feature_dim``, ``with_geometry``, ...; a field on one side only differs;
    - inside the nested groups (``selection``, ``pooling``, ``preprocessing``) the settings are
      compared (numbers, booleans, nulls, lists) and text is not: a nested string says in words
      what the code does (``selection.fill``, ``preprocessing.resize``, ...), so correcting its
      wording orphans no checkpoint. When what such a text describes changes, the features change
      meaning: bump :data:`IDENTITY_FORMAT` (the compared ``format``);
    - :data:`LOCATION_FIELDS` (where the weights were found) are ignored.

    Args:
        model_config_extractor: ``AdaptConfig.extractor`` of the model (``None``: unknown origin,
            e.g. a model trained on SCAN precomp files).
        identity: ``RegionExtractor.identity`` of the extractor about to produce features (or the
            identity recorded with features; ``None``: unknown origin).
        allow_mismatch: warn instead of raising.
        names: what the two identities belong to, for the message.
        advice: the message's last sentence: what the user can do.

    Returns:
        The differences found (empty when the extractor matches).

    Raises:
        ExtractorMismatchError: on any difference (or unknown origin) unless ``allow_mismatch``.
    """
    if model_config_extractor is None or identity is None:
        unknown = names[0] if model_config_extractor is None else names[1]
        problems = [f"the {unknown} does not record which region extractor produced its features "
                    "(unknown origin, e.g. SCAN/VSE precomp files)"]
    else:
        problems = identity_differences(model_config_extractor, identity, names)
    if not problems:
        return []
    expected, actual = ((tree or {}).get("name", "an unknown extractor") for tree in (model_config_extractor, identity))
    message = (
        f"region extractor mismatch: the {names[0]} names {expected!r}, the {names[1]} {actual!r}, with other "
        "settings:\n  - " + "\n  - ".join(problems) +
        "\nFeatures from a different detector or backbone silently ruin recall: the model still returns "
        f"scores, but they are meaningless. {advice}"
    )
    if not allow_mismatch:
        raise ExtractorMismatchError(message)
    warnings.warn(message, stacklevel=2)
    return problems


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
