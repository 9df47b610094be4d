"""Train ADAPT on a precomp dataset with the reference's protocol.

    python -m training.train --config training/configs/f30k_t2i.yaml
    python -m training.train --config training/configs/cpu_small.yaml data.path=data/f30k_precomp \\
        train.max_iterations=2000
    python -m training.train --config training/configs/f30k_t2i.yaml --resume   # after an interruption

Protocol (DESIGN.md section 1, the reference's ``options/adapt/*.yaml``): Adamax with a warm-up
then step-decay lr schedule (:mod:`training.schedule`), gradient-norm clipping, the hinge loss with
its sum->max schedule, validation on rsum every ``val_every`` iterations, early stopping after
``early_stop`` validations without improvement, the best checkpoint kept.

The output folder ``train.out_dir`` holds:

- ``best/``: the best checkpoint on validation rsum (``AdaptModel.from_pretrained`` loads it;
  ``config.json`` carries the validation metrics in ``card``), with a generated README.md;
- ``training_state/``: all that an exact resume needs (model, optimiser, loss iteration, data
  position, RNG states, progress): ``tensors.safetensors`` + ``state.json``, no pickle;
- ``train_log.csv`` (one row per iteration), ``val_log.csv`` (one per validation),
  ``training_curves.png``, ``config.yaml`` (the resolved config), ``tensorboard/`` if installed.

Interrupting (Ctrl-C or SIGTERM) finishes the current iteration, saves the training state and
exits; so does reaching ``train.max_iterations``. ``--resume`` continues from the saved state and
gives the same weights and metrics as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from adapt import AdaptConfig, AdaptModel, CheckpointError, ConfigError, HingeLoss, build_vocab, pick_device
from training.data import (
    CAPTIONS_PER_IMAGE,
    CaptionPairs,
    DatasetError,
    DistinctImageBatches,
    PairBatch,
    PairCollate,
    Split,
    load_split,
)
from training.evaluate import check_features, score_matrix
from training.metrics import DIRECTIONS, METRICS, retrieval_metrics
from training.push import model_card
from training.schedule import WarmupStepSchedule

STATE_DIR = "training_state"
BEST_DIR = "best"
# Keys that may differ between a saved run and the config it is resumed with: they change how long
# or where the run goes, not what one iteration computes.
RESUMABLE_CHANGES = {"train.max_iterations", "train.epochs", "train.early_stop", "train.workers",
                     "train.device", "train.progress", "train.out_dir", "data.path"}
_MODEL_KEYS_FROM_DATA = ("vocab", "extractor", "card")  # filled in by build_model, not by the config


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# -- configuration -------------------------------------------------------------------------------


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

    def schedule(self) -> WarmupStepSchedule:
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
    memory_budget_mb: float = 256.0  # bound on ADAPT's pair tensors per block (adapt.similarity)
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


def build_model(config: TrainConfig, train: Split) -> AdaptModel:
    """The model a training config describes, sized for the training data.

    The vocabulary is built from the training captions, ``region_dim`` is the features' size and
    ``extractor`` comes from the dataset's ``extractor.json`` (``None`` for plain precomp files).
    """
    model_fields = dict(config.model)
    if model_fields.get("region_dim", train.region_dim) != train.region_dim:
        raise ConfigError(f"model.region_dim={model_fields['region_dim']} but the features in {train} are "
                          f"{train.region_dim}-d; drop model.region_dim to take it from the data")
    gru = model_fields.get("text_encoder", "gru") == "gru"
    vocab = build_vocab(train.captions, config.data.vocab_min_count) if gru else []
    adapt_config = AdaptConfig.from_dict({**model_fields, "region_dim": train.region_dim, "vocab": vocab,
                                          "extractor": train.extractor})
    torch.manual_seed(config.train.seed)
    return AdaptModel(adapt_config)


# -- training state ------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run is. ``batch`` is the next batch of ``epoch``; ``finished`` says why it ended
    (``"epochs"`` or ``"early_stop"``), ``None`` while it can go on."""

    iteration: int = 0
    epoch: int = 0
    batch: int = 0
    best_rsum: float | None = None
    best_iteration: int | None = None
    bad_validations: int = 0
    last_validation: int | None = None
    finished: str | None = None


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able skeleton referring to them."""
    tensors, state = {}, {}
    for pid, entry in optimizer.state_dict()["state"].items():
        state[str(pid)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value
                state[str(pid)][name] = {"tensor": f"optimizer.{pid}.{name}"}
            else:
                state[str(pid)][name] = value
    return tensors, {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       skeleton: dict[str, Any]) -> None:
    state = {int(pid): {name: tensors[v["tensor"]] if isinstance(v, dict) else v for name, v in entry.items()}
             for pid, entry in skeleton["state"].items()}
    # JSON turned tuples (Adamax's betas) into lists; give them back their live types.
    groups = [{k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()}
              for saved, live in zip(skeleton["param_groups"], optimizer.param_groups, strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _replace_dir(staged: Path, final: Path) -> None:
    """Swap a fully written folder in, so a crash never leaves a half-written one behind."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def read_training_state(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` saved in ``out_dir/training_state`` (or its ``.old`` copy after a crash)."""
    folder = out_dir / STATE_DIR
    if not folder.is_dir() and folder.with_name(STATE_DIR + ".old").is_dir():
        folder = folder.with_name(STATE_DIR + ".old")
    if not (folder / "state.json").is_file():
        raise TrainingError(f"nothing to resume: no {STATE_DIR}/state.json in {out_dir}")
    return load_file(str(folder / "tensors.safetensors")), json.loads((folder / "state.json").read_text())


# -- logs ----------------------------------------------------------------------------------------

TRAIN_FIELDS = ("iteration", "epoch", "loss", "lr", "grad_norm", "k", "seconds")
VAL_FIELDS = ("iteration", "epoch", *(f"{d}_{m}" for d in DIRECTIONS for m in METRICS), "rsum", "best")


class RunLog:
    """CSV logs (and TensorBoard when installed) of a run, kept consistent across resumes.

    Args:
        out_dir: the run folder.
        resume_iteration: on resume, rows logged after the saved state (``iteration >`` this) are
            dropped: the resumed run logs them again.
    """

    def __init__(self, out_dir: Path, resume_iteration: int | None) -> None:
        self.out_dir = out_dir
        self.paths = {"train": out_dir / "train_log.csv", "val": out_dir / "val_log.csv"}
        self.files, self.writers = {}, {}
        for kind, fields in (("train", TRAIN_FIELDS), ("val", VAL_FIELDS)):
            kept = self.read(kind, resume_iteration) if resume_iteration is not None else []
            with self.paths[kind].open("w", newline="") as f:
                writer = csv.DictWriter(f, fields)
                writer.writeheader()
                writer.writerows(kept)
            self.files[kind] = self.paths[kind].open("a", newline="")
            self.writers[kind] = csv.DictWriter(self.files[kind], fields)
        self.tensorboard = _tensorboard_writer(out_dir / "tensorboard", (resume_iteration or 0) + 1)

    def read(self, kind: str, up_to: int | None = None) -> list[dict[str, str]]:
        """Rows of a log (those with ``iteration <= up_to``); a row cut short by a crash is skipped."""
        if not self.paths[kind].is_file():
            return []
        with self.paths[kind].open(newline="") as f:
            rows = list(csv.DictReader(f))
        return [r for r in rows if None not in r.values() and r["iteration"].isdigit()
                and (up_to is None or int(r["iteration"]) <= up_to)]

    def write(self, kind: str, row: dict[str, Any]) -> None:
        self.writers[kind].writerow(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("iteration", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, row["iteration"])

    def flush(self) -> None:
        for f in self.files.values():
            f.flush()
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def plot(self, path: Path) -> None:
        """Training loss (raw and smoothed) and validation rsum over iterations, as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train, val = self.read("train"), self.read("val")
        figure = Figure(figsize=(10, 4), constrained_layout=True)
        FigureCanvasAgg(figure)
        loss_ax, rsum_ax = figure.subplots(1, 2)
        if train:
            steps = np.array([int(r["iteration"]) for r in train])
            loss = np.array([float(r["loss"]) for r in train])
            window = max(1, len(loss) // 50)
            loss_ax.plot(steps, loss, alpha=0.25 if window > 1 else 1.0, color="tab:blue", label="per iteration")
            if window > 1:
                smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
                loss_ax.plot(steps[window - 1 :], smooth, color="tab:blue", label=f"mean of {window}")
                loss_ax.legend()
        loss_ax.set(xlabel="iteration", ylabel="hinge loss", title="training loss")
        if val:
            steps = [int(r["iteration"]) for r in val]
            rsum = [float(r["rsum"]) for r in val]
            rsum_ax.plot(steps, rsum, marker="o", color="tab:orange")
            best = int(np.argmax(rsum))
            rsum_ax.annotate(f"best {rsum[best]:.1f}", (steps[best], rsum[best]))
        rsum_ax.set(xlabel="iteration", ylabel="rsum", title="validation rsum")
        figure.savefig(path, dpi=100)


def _tensorboard_writer(folder: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


class StopOnSignal:
    """Turn the first SIGINT / SIGTERM into a request to stop after the current iteration.

    A second Ctrl-C aborts at once (without saving).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        tqdm.write(f"{self.received}: stopping after this iteration and saving the training state "
                   "(Ctrl-C again to abort without saving)")

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- the trainer ---------------------------------------------------------------------------------


class Trainer:
    """One training run: set up from a config (fresh, or resumed from ``out_dir``), then :meth:`fit`.

    Args:
        config: the run.
        resume: continue the run saved in ``config.train.out_dir``.
    """

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.config = config
        self.out_dir = Path(config.train.out_dir)
        run, data = config.train, config.data
        self.device = pick_device() if run.device == "auto" else torch.device(run.device)
        self.train_split = load_split(data.path, data.train_split, data.captions_per_image)
        val = load_split(data.path, data.val_split, data.captions_per_image)
        self.val_split = val.images(0, min(data.val_max_images, val.n_images)) if data.val_max_images else val

        if resume:
            tensors, state = read_training_state(self.out_dir)
            _check_resumable(TrainConfig.from_dict(state["config"]), config)
            self.model = AdaptModel(AdaptConfig.from_dict(state["model_config"]), load_pretrained_text=False)
            self.progress = Progress(**state["progress"])
        else:
            if (self.out_dir / STATE_DIR).exists():
                raise TrainingError(f"{self.out_dir} already holds a run; pass --resume to continue it, or "
                                    "set train.out_dir to another folder")
            self.model = build_model(config, self.train_split)
            self.progress = Progress()
        check_features(self.model, self.train_split, "the model")
        self.model.to(self.device).train()

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adamax(self.params, lr=config.optim.lr)
        self.schedule = config.optim.schedule()
        self.criterion = HingeLoss(config.loss.margin, config.loss.eta).to(self.device)
        cuda_amp = self.device.type == "cuda" and run.amp
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda_amp else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.sampler = DistinctImageBatches(self.train_split.n_images, data.captions_per_image, run.batch_size,
                                            run.seed)
        if resume:
            self._restore(tensors, state)
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.log = RunLog(self.out_dir, self.progress.iteration if resume else None)

    # -- loop --

    def fit(self) -> Progress:
        """Train until the epochs are done, early stopping, ``max_iterations`` or a signal."""
        p, run = self.progress, self.config.train
        if p.finished:
            tqdm.write(f"{self.out_dir}: this run already finished ({p.finished}); best rsum {p.best_rsum}")
            return p
        planned = run.epochs * len(self.sampler)
        bar = tqdm(total=min(planned, run.max_iterations or planned), initial=p.iteration, unit="it",
                   disable=not run.progress, dynamic_ncols=True, desc="train")
        pause = None
        with StopOnSignal() as signals:
            while not p.finished and not (pause := self._pause_reason(signals)):
                if p.epoch >= run.epochs:
                    self._finish("epochs")
                    break
                batches = self.sampler.epoch(p.epoch)
                for batch in self._loader(batches[p.batch :]):
                    row = self._step(batch)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", epoch=p.epoch)
                    if p.iteration % run.val_every == 0:
                        self._validate()
                    if p.finished or self._pause_reason(signals):
                        break
                else:
                    p.epoch, p.batch = p.epoch + 1, 0
        bar.close()
        self.log.flush()
        self._save_state()
        self.log.plot(self.out_dir / "training_curves.png")
        self.log.close()
        tqdm.write(self._summary(pause))
        return p

    def _pause_reason(self, signals: StopOnSignal) -> str | None:
        limit = self.config.train.max_iterations
        if limit is not None and self.progress.iteration >= limit:
            return f"reached train.max_iterations={limit}"
        return f"received {signals.received}" if signals.received else None

    def _loader(self, batches: list[np.ndarray]) -> DataLoader:
        # A generator of its own: a DataLoader otherwise draws its worker seed from the global RNG
        # each epoch, and a resumed run (which starts one more loader) would drift from an
        # uninterrupted one.
        generator = torch.Generator().manual_seed(self.config.train.seed + self.progress.epoch)
        return DataLoader(CaptionPairs(self.train_split), batch_sampler=batches,
                          collate_fn=PairCollate(self.train_split, self.model.tokenize),
                          num_workers=self.config.train.workers, pin_memory=self.device.type == "cuda",
                          generator=generator)

    def _step(self, batch: PairBatch) -> dict[str, Any]:
        """One optimiser step on a batch; returns its log row."""
        start = time.perf_counter()
        p = self.progress
        features = batch.features.to(self.device, non_blocking=True)
        tokens = batch.tokens.to(self.device)
        lr = self.schedule.apply(self.optimizer, p.iteration)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            scores = self.model(features, tokens, memory_budget_mb=self.config.train.memory_budget_mb).scores
        loss = self.criterion(scores.float())
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss is {loss.item()} at iteration {p.iteration}; the last saved state is "
                                f"in {self.out_dir / STATE_DIR}. Try a lower optim.lr or train.amp=false")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        p.iteration += 1
        p.batch += 1
        row = {"iteration": p.iteration, "epoch": p.epoch, "loss": loss.item(), "lr": lr,
               "grad_norm": grad_norm.item(), "k": self.criterion.k, "seconds": time.perf_counter() - start}
        self.log.write("train", row)
        return row

    def _validate(self) -> dict[str, float]:
        """Score the validation split, keep the best checkpoint, count towards early stopping."""
        p = self.progress
        scores = score_matrix(self.model, self.val_split, memory_budget_mb=self.config.train.memory_budget_mb,
                              progress=self.config.train.progress)
        metrics = retrieval_metrics(scores, self.val_split.captions_per_image)
        # As the reference: a tie with the best counts as an improvement.
        improved = p.best_rsum is None or metrics["rsum"] >= p.best_rsum
        if improved:
            p.best_rsum, p.best_iteration, p.bad_validations = metrics["rsum"], p.iteration, 0
            self._save_best(metrics)
        else:
            p.bad_validations += 1
            if p.bad_validations >= self.config.train.early_stop:
                p.finished = "early_stop"
        p.last_validation = p.iteration
        self.log.write("val", {"iteration": p.iteration, "epoch": p.epoch, **metrics, "best": int(improved)})
        tqdm.write(f"iteration {p.iteration}: validation rsum {metrics['rsum']:.1f} "
                   f"(best {p.best_rsum:.1f} at {p.best_iteration}) R@1 i2t {metrics['i2t_r1']:.1f} "
                   f"t2i {metrics['t2i_r1']:.1f}")
        self.log.flush()  # before the state: every row up to a saved iteration is on disk
        self._save_state()
        self.log.plot(self.out_dir / "training_curves.png")
        return metrics

    def _finish(self, reason: str) -> None:
        if self.progress.last_validation != self.progress.iteration:
            self._validate()
        self.progress.finished = self.progress.finished or reason

    # -- saving --

    def _card(self, metrics: dict[str, float]) -> dict[str, Any]:
        cfg, p = self.config, self.progress
        return {
            "data": {"name": cfg.data.name, "path": cfg.data.path, "train_split": cfg.data.train_split,
                     "train_images": self.train_split.n_images, "train_captions": self.train_split.n_captions,
                     "regions_per_image": self.train_split.n_regions},
            "validation": {"split": cfg.data.val_split, "images": self.val_split.n_images,
                           "captions": self.val_split.n_captions, "iteration": p.iteration, "epoch": p.epoch,
                           "metrics": metrics},
            "training": {"loss": dataclasses.asdict(cfg.loss), "optim": dataclasses.asdict(cfg.optim),
                         "batch_size": cfg.train.batch_size, "seed": cfg.train.seed, "optimizer": "Adamax"},
        }

    def _save_best(self, metrics: dict[str, float]) -> None:
        self.model.config.card = self._card(metrics)
        staged = _fresh_dir(self.out_dir / (BEST_DIR + ".tmp"))
        self.model.save_pretrained(staged)
        (staged / "README.md").write_text(model_card(self.model.config), encoding="utf-8")
        _replace_dir(staged, self.out_dir / BEST_DIR)

    def _save_state(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors["loss.iteration"] = self.criterion.iteration
        optimizer_tensors, optimizer_skeleton = _optimizer_state(self.optimizer)
        tensors.update(optimizer_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        state = {"progress": dataclasses.asdict(self.progress), "config": self.config.to_dict(),
                 "model_config": self.model.config.to_dict(), "optimizer": optimizer_skeleton,
                 "scaler": self.scaler.state_dict()}
        staged = _fresh_dir(self.out_dir / (STATE_DIR + ".tmp"))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staged / "tensors.safetensors"))
        (staged / "state.json").write_text(json.dumps(state, indent=1))
        _replace_dir(staged, self.out_dir / STATE_DIR)

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.criterion.iteration.copy_(tensors["loss.iteration"])
        _restore_optimizer(self.optimizer, tensors, state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])

    def _summary(self, pause: str | None) -> str:
        p = self.progress
        best = (f"best validation rsum {p.best_rsum:.1f} at iteration {p.best_iteration}: {self.out_dir / BEST_DIR}"
                if p.best_rsum is not None else "no validation yet")
        if p.finished:
            return f"finished ({p.finished}) after {p.iteration} iterations; {best}"
        return (f"paused at iteration {p.iteration} ({pause}); {best}. Continue with: python -m training.train "
                f"--config ... --resume (and a larger train.max_iterations if that stopped it)")


def _check_resumable(saved: TrainConfig, given: TrainConfig) -> None:
    def flat(config: TrainConfig) -> dict[str, Any]:
        return {f"{section}.{key}": value for section, values in config.to_dict().items()
                for key, value in values.items()}

    old, new = flat(saved), flat(given)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = "; ".join(f"{k}: saved {old.get(k)!r}, now {new.get(k)!r}" for k in changed)
        raise TrainingError(f"cannot resume with a different config ({details}). Only "
                            f"{sorted(RESUMABLE_CHANGES)} may change on resume")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path,
                        help="YAML config, e.g. training/configs/f30k_t2i.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.batch_size=32 model.latent_size=256")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in train.out_dir exactly where it stopped")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False))
            return 0
        Trainer(config, resume=args.resume).fit()
    except (ConfigError, DatasetError, TrainingError, CheckpointError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
