"""One serialisable configuration for an ADAPT model.

Everything needed to rebuild a model's architecture lives here and is written to ``config.json``
next to the weights. Training hyper-parameters (learning rate, schedule, ...) do not: they belong to
``training/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

SimilarityKind = Literal["t2i", "i2t", "ensemble", "mean"]
TextEncoderKind = Literal["gru", "transformer"]
RegionEncoderKind = Literal["linear", "concepts"]
Normalization = Literal["batchnorm", "none"]
CONFIG_FORMAT = 1  # the layout this code writes and the newest it reads
ABSENT = "<absent>"  # what field_differences shows for a field that one side lacks and has no default


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


def field_differences(first: Mapping[str, Any], second: Mapping[str, Any], labels: tuple[str, str],
                      defaults: Mapping[str, Any] | None = None) -> list[str]:
    """A ``field: <labels[0]> X, <labels[1]> Y`` line for each field in which two flat records
    (configs, extractor identities, fingerprints) differ, sorted by field.

    A field that one side lacks counts as its value in ``defaults``, else as :data:`ABSENT`.
    """
    defaults = defaults or {}
    lines = []
    for key in sorted(first.keys() | second.keys()):
        was, now = (side.get(key, defaults.get(key, ABSENT)) for side in (first, second))
        if was != now:
            lines.append(f"{key}: {labels[0]} {was!r}, {labels[1]} {now!r}")
    return lines


def _check_format(version: Any) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"format={version!r} is not a config format (a positive integer)")
    if version > CONFIG_FORMAT:
        raise ConfigError(f"this config has format {version}, newer than this adapt reads (format "
                          f"{CONFIG_FORMAT}): upgrade adapt to load it")


@dataclass
class AdaptConfig:
    """Architecture of an :class:`adapt.model.AdaptModel`.

    Attributes:
        region_dim: size of one input region feature (2048 for bottom-up-attention features,
            1280 for the bundled EfficientNet-Lite0 extractor, + 5 with box geometry).
        latent_size: size ``d`` of the joint space (1024 in the paper).
        similarity: ``"t2i"`` (text adapts image regions; the paper's best), ``"i2t"`` (image adapts
            words), ``"ensemble"`` (average of both score matrices) or ``"mean"`` (the baseline
            without ADAPT: cosine of mean-pooled regions and mean-pooled words).
        lambda_t2i: fovea sharpness for T2I (paper: 10 on Flickr30k, 5 on COCO).
        lambda_i2t: fovea sharpness for I2T (reference Flickr30k config: 10).
        normalization: ``"batchnorm"`` (BatchNorm1d without affine on the adapted modality, as in
            the reference) or ``"none"``.
        region_encoder: ``"linear"`` (the reference's Linear + LeakyReLU + l2norm) or ``"concepts"``
            (the same plus each region's ConSE vector: named concepts of the backbone's ImageNet
            head and the detector, see :mod:`adapt.concepts`; needs the transformer text encoder).
        concepts: for ``region_encoder="concepts"``: the classifier's class names (and optionally
            the ``descriptions`` embedded for them), the detector's label names, the backbone size
            and ``top_k`` (see :func:`adapt.concepts.default_concepts`).
        text_encoder: ``"gru"`` (word vectors + BiGRU, the paper's) or ``"transformer"``.
        vocab: the GRU encoder's vocabulary (index 0 is padding, 1 unknown); built by training.
        word_vectors: name of the frozen pretrained word-vector source for the GRU encoder
            (see :data:`adapt.encoders.WORD_VECTOR_SOURCES`), e.g. ``"glove-6b-50d"`` or ``"random"``.
        word_dim: size of the trainable word embedding (and of the frozen one for ``"random"``).
        transformer_name: Hub id or local path of the transformer text encoder.
        finetune_transformer: train the transformer (its weights are then saved with the model);
            when False it stays frozen and is re-loaded from ``transformer_name``.
        max_tokens: captions are cut to this many tokens (``None``: no limit).
        reference_padding: reproduce the reference code's handling of padded captions: the GRU
            runs over padding, and I2T truncates captions to 34 tokens and neither masks padding in
            its BatchNorm, fovea softmax nor max-pooling. Off by default: masking is correct.
        extractor: identity of the region extractor the training features came from (see
            ``adapt.regions``); ``None`` for features of unknown origin (e.g. SCAN precomp files).
        card: free-form metadata for the model card (data, metrics, licence).
        format: version of this layout, :data:`CONFIG_FORMAT`; raised when a field changes meaning,
            so that older code refuses the config instead of misreading it. ``config.json`` files
            written before the field existed have none and read as format 1.
    """

    region_dim: int = 2048
    latent_size: int = 1024
    similarity: SimilarityKind = "t2i"
    lambda_t2i: float = 10.0
    lambda_i2t: float = 10.0
    normalization: Normalization = "batchnorm"
    region_encoder: RegionEncoderKind = "linear"
    concepts: dict[str, Any] | None = None
    text_encoder: TextEncoderKind = "gru"
    vocab: list[str] = field(default_factory=list)
    word_vectors: str = "glove-6b-50d"
    word_dim: int = 300
    transformer_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    finetune_transformer: bool = False
    max_tokens: int | None = None
    reference_padding: bool = False
    extractor: dict[str, Any] | None = None
    card: dict[str, Any] = field(default_factory=dict)
    format: int = CONFIG_FORMAT

    def __post_init__(self) -> None:
        _check_format(self.format)
        choices = {
            "similarity": ("t2i", "i2t", "ensemble", "mean"),
            "text_encoder": ("gru", "transformer"),
            "normalization": ("batchnorm", "none"),
            "region_encoder": ("linear", "concepts"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.region_encoder == "concepts" and (self.text_encoder != "transformer" or not self.concepts):
            raise ConfigError('region_encoder="concepts" needs text_encoder="transformer" and a concepts table '
                              "(adapt.concepts.default_concepts())")
        for name in ("region_dim", "latent_size", "word_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")

    @property
    def directions(self) -> tuple[str, ...]:
        """The similarity heads this model computes: ``("t2i",)``, ``("i2t",)``, both, or ``("mean",)``."""
        return ("t2i", "i2t") if self.similarity == "ensemble" else (self.similarity,)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdaptConfig":
        """Build a config from ``to_dict()`` output (or an older one, without ``format``), refusing
        a newer format and unknown keys by name."""
        _check_format(data.get("format", 1))  # before the keys: a newer format may add some
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)
