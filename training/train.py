"""Train ADAPT on a precomp dataset with the reference's protocol.

    python -m training.train --config training/configs/f30k_t2i.yaml
    python -m training.train --config training/configs/cpu_small.yaml data.path=data/f30k_precomp \\
        train.max_iterations=2000
    python -m training.train --config training/configs/f30k_t2i.yaml --resume   # after an interruption
    torchrun --nproc_per_node 4 -m training.train --config training/configs/f30k_t2i.yaml  # 4 processes

Protocol (the paper's training details, Wehrmann et al., AAAI 2020, arXiv:1911.09370, and the reference
code's ``options/adapt/abstract.yaml`` in jwehrmann/retrieval.pytorch): Adamax with a warm-up
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

Under ``torchrun`` every process trains on its shard of each global batch of ``train.batch_size``
and the loss is that of the whole global batch (:mod:`training.distributed`); rank 0 alone
validates and writes the output folder and the progress bar.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from adapt import AdaptConfig, AdaptModel, CheckpointError, ConfigError, HingeLoss, build_vocab, pick_device
from adapt.concepts import default_concepts
from training import distributed
from training.card import model_card, training_card
from training.config import TrainConfig, load_config
from training.data import (CaptionPairs, DatasetError, DistinctImageBatches, PairBatch, PairCollate, Split, load_split,
                           resolve_extractor)
from training.evaluate import check_features, score_matrix
from training.logs import RunLog
from training.metrics import retrieval_metrics
from training.signals import StopOnSignal
from training.state import (
    STATE_DIR,
    Progress,
    TrainingError,
    check_resumable,
    fresh_dir,
    read_training_state,
    replace_dir,
    restore_training_state,
    save_training_state,
)

BEST_DIR = "best"


def build_model(config: TrainConfig, train: Split) -> AdaptModel:
    """The model a training config describes, sized for the training data.

    The vocabulary is built from the training captions, ``region_dim`` is the features' size and
    ``extractor`` comes from the dataset's ``extractor.json`` (``None`` for plain precomp files).
    """
    model_fields = dict(config.model)
    if model_fields.get("region_dim", train.region_dim) != train.region_dim:
        raise ConfigError(f"model.region_dim={model_fields['region_dim']} but the features in {train} are "
                          f"{train.region_dim}-d; drop model.region_dim to take it from the data")
    if model_fields.get("region_encoder") == "concepts" and "classes" not in (model_fields.get("concepts") or {}):
        # A config's concepts without a table are default_concepts' options (top_k, scene_weight).
        model_fields["concepts"] = default_concepts(**(model_fields.get("concepts") or {}))
    gru = model_fields.get("text_encoder", "gru") == "gru"
    vocab = build_vocab(train.captions, config.data.vocab_min_count) if gru else []
    adapt_config = AdaptConfig.from_dict({**model_fields, "region_dim": train.region_dim, "vocab": vocab,
                                          "extractor": resolve_extractor(train, config.data.extractor)})
    torch.manual_seed(config.train.seed)
    return AdaptModel(adapt_config)


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
        self.world, self.device = distributed.start(self.device)
        self.train_split = load_split(data.path, data.train_split, data.captions_per_image)
        val = load_split(data.path, data.val_split, data.captions_per_image)
        self.val_split = val.images(0, min(data.val_max_images, val.n_images)) if data.val_max_images else val

        if resume:
            tensors, state = read_training_state(self.out_dir)
            check_resumable(TrainConfig.from_dict(state["config"]), config)
            self.model = AdaptModel(AdaptConfig.from_dict(state["model_config"]), load_pretrained=False)
            self.progress = Progress(**state["progress"])
        else:
            if (self.out_dir / STATE_DIR).exists():
                raise TrainingError(f"{self.out_dir} already holds a run; pass --resume to continue it, or "
                                    "set train.out_dir to another folder")
            self.model = build_model(config, self.train_split)
            self.progress = Progress()
        check_features(self.model, self.train_split, "the model")
        self.model.to(self.device).train()

        frozen = tuple(config.optim.frozen)
        names = [name for name, _ in self.model.named_parameters()]
        unmatched = [prefix for prefix in frozen if not any(name.startswith(prefix) for name in names)]
        if unmatched:
            raise ConfigError(f"optim.frozen: no parameter starts with {unmatched}; names look like {names[:4]}")
        self.params = [p for name, p in self.model.named_parameters()
                       if p.requires_grad and not (frozen and name.startswith(frozen))]
        self.optimizer = torch.optim.Adamax(self.params, lr=config.optim.lr)
        self.schedule = config.optim.schedule()
        self.criterion = HingeLoss(config.loss.margin, config.loss.eta).to(self.device)
        cuda_amp = self.device.type == "cuda" and run.amp
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda_amp else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.sampler = DistinctImageBatches(self.train_split.n_images, data.captions_per_image, run.batch_size,
                                            run.seed, self.world.rank, self.world.size)
        if resume:
            restore_training_state(tensors, state, self.model, self.criterion, self.optimizer, self.scaler,
                                   self.world.rank, self.device)
        elif self.world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.log = (RunLog(self.out_dir, self.progress.iteration if resume else None) if self.world.is_main
                    else distributed.SilentLog())
        # Under torchrun: the global batch's scores, each rank encoding its shard (training/distributed.py).
        self.global_scores = (distributed.data_parallel(self.model, run.memory_budget_mb, self.device)
                              if self.world.size > 1 else None)

    # -- loop --

    def fit(self) -> Progress:
        """Train until the epochs are done, early stopping, ``max_iterations`` or a signal."""
        p, run = self.progress, self.config.train
        if p.finished:
            self._say(f"{self.out_dir}: this run already finished ({p.finished}); best rsum {p.best_rsum}")
            return p
        planned = run.epochs * len(self.sampler)
        bar = tqdm(total=min(planned, run.max_iterations or planned), initial=p.iteration, unit="it",
                   disable=not (run.progress and self.world.is_main), dynamic_ncols=True, desc="train")
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
        self._say(self._summary(pause))
        return p

    def _pause_reason(self, signals: StopOnSignal) -> str | None:
        limit = self.config.train.max_iterations
        if limit is not None and self.progress.iteration >= limit:
            return f"reached train.max_iterations={limit}"
        received = signals.received
        if self.world.size > 1:  # every rank stops at the same iteration
            received = distributed.agreed_signal(received, self.device)
        return f"received {received}" if received else None

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
            scores = (self.global_scores(features, tokens) if self.global_scores is not None
                      else self.model(features, tokens, memory_budget_mb=self.config.train.memory_budget_mb).scores)
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

    def _validate(self) -> None:
        """Score the validation split, keep the best checkpoint, count towards early stopping, save
        the state. Under torchrun rank 0 validates and the other ranks take its progress."""
        if self.world.is_main:
            self._score_validation()
        if self.world.size > 1:
            distributed.update_from_main(self.progress)
        self._save_state()
        self.log.plot(self.out_dir / "training_curves.png")

    def _score_validation(self) -> dict[str, float]:
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
        return metrics

    def _finish(self, reason: str) -> None:
        if self.progress.last_validation != self.progress.iteration:
            self._validate()
        self.progress.finished = self.progress.finished or reason

    # -- saving --

    def _save_best(self, metrics: dict[str, float]) -> None:
        self.model.config.card = training_card(self.config, self.train_split, self.val_split, self.progress, metrics)
        staged = fresh_dir(self.out_dir / (BEST_DIR + ".tmp"))
        self.model.save_pretrained(staged)
        (staged / "README.md").write_text(model_card(self.model.config), encoding="utf-8")
        replace_dir(staged, self.out_dir / BEST_DIR)

    def _say(self, message: str) -> None:
        if self.world.is_main:
            tqdm.write(message)

    def _save_state(self) -> None:
        # Under torchrun every rank takes part (its RNG states are saved too); rank 0 writes.
        rank_rng = distributed.rng_states(self.device) if self.world.size > 1 else None
        if self.world.is_main:
            save_training_state(self.out_dir, self.config, self.progress, self.model, self.criterion,
                                self.optimizer, self.scaler, rank_rng)

    def _summary(self, pause: str | None) -> str:
        p = self.progress
        best = (f"best validation rsum {p.best_rsum:.1f} at iteration {p.best_iteration}: {self.out_dir / BEST_DIR}"
                if p.best_rsum is not None else "no validation yet")
        if p.finished:
            return f"finished ({p.finished}) after {p.iteration} iterations; {best}"
        return (f"paused at iteration {p.iteration} ({pause}); {best}. Continue with: python -m training.train "
                f"--config ... --resume (and a larger train.max_iterations if that stopped it)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.train``; returns the exit status (argument errors exit with 2)."""
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
        distributed.stop()
    except (ConfigError, DatasetError, TrainingError, CheckpointError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
