"""The training config: its schema (one dataclass per YAML section), YAML ``extends`` and overrides.

A config file has the sections ``data``, ``model``, ``loss``, ``optim`` and ``train`` (see
``training/configs/``); ``extends: other.yaml`` merges the file over another one, and command-line
overrides ``section.key=value`` over both. Values are checked and coerced to the schema's types
(YAML reads ``1e-3`` as a string); unknown keys are refused with the known ones listed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from adapt import AdaptConfig, ConfigError
from adapt.regions import BACKENDS
from adapt.similarity import DEFAULT_MEMORY_BUDGET_MB
from training.data import CAPTIONS_PER_IMAGE
from training.schedule import WarmupStepSchedule

_MODEL_KEYS_FROM_DATA = ("vocab", "extractor", "card")  # filled in by build_model, not by the config


@dataclass
class DataConfig:
    """``data:``: where the precomp files are and how to read them."""

    path: str = "data/f30k_precomp"
    name: str = "custom"  # for the model card, e.g. "Flickr30k (SCAN bottom-up-attention features)"
    train_split: str = "train"
    val_split: str = "dev"
    val_max_images: int | None = 1000  # reference: the first 5000 dev captions
    captions_per_image: int = CAPTIONS_PER_IMAGE
    vocab_min_count: int = 1
    # A folder without extractor.json (SCAN / VSE precomp) does not say which region extractor made its
    # features: name the backend here (bottom-up-attention for those files) so the checkpoint records it.
    extractor: str | None = None


@dataclass
class LossConfig:
    """``loss:``: :class:`adapt.HingeLoss` arguments."""

    margin: float = 0.2
    eta: float = 0.991


@dataclass
class OptimConfig:
    """``optim:``: Adamax and its lr schedule (see :class:`training.schedule.WarmupStepSchedule`)."""

    lr: float = 1e-3
    warmup_start: float = 0.5
    warmup_end: float = 2.0
    warmup_iterations: int = 4000
    decay_at: list[int] = field(default_factory=lambda: [10000, 13000, 16000, 19000])
    decay_factor: float = 0.25
    grad_clip: float = 2.0  # max gradient norm; 0 turns clipping off
    # Parameter-name prefixes kept at their initial values, e.g. ["text_encoder.proj"]: a model
    # started at a zero-shot solution keeps that part of it (see adapt.concepts).
    frozen: list[str] = field(default_factory=list)

    def schedule(self) -> WarmupStepSchedule:
        """The learning-rate schedule these settings describe."""
        return WarmupStepSchedule(self.lr, self.warmup_start, self.warmup_end, self.warmup_iterations,
                                  tuple(self.decay_at), self.decay_factor)


@dataclass
class RunConfig:
    """``train:``: batching, length, validation, hardware."""

    out_dir: str = "runs/adapt"
    batch_size: int = 128
    epochs: int = 30
    max_iterations: int | None = None  # pause here (resume with a larger value to go on)
    val_every: int = 500
    early_stop: int = 20
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available
    amp: bool = True  # CUDA only: autocast to bf16 (fp16 + loss scaling where bf16 is unsupported)
    workers: int = 0  # DataLoader worker processes
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB  # bound on ADAPT's pair tensors per block
    progress: bool = True


@dataclass
class TrainConfig:
    """A whole training run. ``model`` holds :class:`adapt.AdaptConfig` fields except vocab,
    extractor and card, which come from the data and the run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML / JSON data, sections as nested dicts."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build and check a config; unknown keys and wrongly typed values raise ConfigError."""
        config = _dataclass_from_dict(cls, data, "")
        known = {f.name for f in dataclasses.fields(AdaptConfig)} - set(_MODEL_KEYS_FROM_DATA)
        unknown = sorted(set(config.model) - known)
        if unknown:
            raise ConfigError(f"unknown model keys {unknown}; known: {sorted(known)}")
        positive = {"train.batch_size": config.train.batch_size, "train.val_every": config.train.val_every,
                    "train.epochs": config.train.epochs, "data.captions_per_image": config.data.captions_per_image}
        bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
        if bad:
            raise ConfigError(f"these must be at least 1: {', '.join(bad)}")
        if config.data.extractor is not None and config.data.extractor not in BACKENDS:
            raise ConfigError(f"data.extractor={config.data.extractor!r} is no region extractor; known: {sorted(BACKENDS)}")
        return config


def _dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown keys {[f'{where}{k}' for k in unknown]}; known in "
                          f"{where.rstrip('.') or 'the top level'}: {names}")
    return cls(**{k: _coerce(v, hints[k], f"{where}{k}") for k, v in data.items()})


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint``: YAML reads ``1e-3`` as a string and ``2`` as an int for a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(hint):
        return _dataclass_from_dict(hint, value, f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if math.isnan(number) or (hint is int and not number.is_integer()):
            raise ConfigError(f"{key}: expected {'an integer' if hint is int else 'a number'}, got {value!r}")
        return hint(number)
    if hint is str:
        return str(value)
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config as a dict; ``extends: other.yaml`` (relative to the file) is merged under it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = tree.pop("extends", None)
    return _merge(read_config_file(path.parent / base), tree) if base else tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config file with ``section.key=value`` overrides applied (values are parsed as YAML)."""
    tree = read_config_file(path)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.batch_size=32")
        tree.setdefault(parts[0], {})
        if not isinstance(tree[parts[0]], dict):
            raise ConfigError(f"override {item!r}: {parts[0]} is not a section")
        tree[parts[0]][parts[1]] = yaml.safe_load(text) if text.strip() else None
    return TrainConfig.from_dict(tree)
