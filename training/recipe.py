"""From a Hub dataset to a served ADAPT model in one command: the paper's path, every stage resumable.

    python -m training.recipe flickr30k --out runs/f30k [--push you/adapt-f30k]
    python -m training.recipe coco --out runs/coco --dry-run     # the plan with estimates, nothing run

Stages, each recorded in ``OUT/stages/NAME.json`` when done (rerunning the command continues with
the first unfinished one; extraction and training also resume inside a stage):

1. ``prepare``: captions and Karpathy splits from the Hub (:mod:`training.prepare`) -> ``OUT/data``;
2. ``extract``: bottom-up-attention features (36 x 2048, the paper's), images streamed from the
   dataset into the extractor (:mod:`training.extract`) -> ``OUT/features``;
3. ``train-t2i``, ``train-i2t``: the paper's configs (``training/configs/{f30k,coco}_{t2i,i2t}.yaml``)
   with GloVe 840B (AMP on CUDA; ``torchrun`` over all GPUs when there are several) -> ``OUT/t2i``, ``OUT/i2t``;
4. ``evaluate``: both and their ensemble on the test split (COCO: 5K and 1K five-fold), printed beside
   the paper's numbers -> ``OUT/eval``;
5. ``push`` (with ``--push OWNER/NAME``): each checkpoint to ``OWNER/NAME-t2i`` / ``-i2t`` with its card;
6. ``index``: a gallery index of the test split for the T2I model -> ``OUT/index``; serve it with
   ``ADAPT_CHECKPOINT=OUT/t2i/best ADAPT_GALLERY=OUT/index python app.py``;
7. ``space``: the README of a Hugging Face Space serving them (:func:`training.card.space_card`; it asks
   for a GPU, as bottom-up features need one) -> ``OUT/space/README.md``.

``--override section.key=value`` changes both training configs (e.g. ``train.batch_size=64``);
``--extractor-option key=value`` the extractor (e.g. ``weights=FILE``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from adapt import AdaptModel, CheckpointError, ConfigError
from adapt.io import atomic_write
from adapt.regions import BottomUpAttentionExtractor, ExtractorError, build_extractor
from adapt.search import GalleryIndexError
from training import index as gallery
from training import push
from training.card import space_card
from training.config import load_config
from training.data import DatasetError, load_split
from training.evaluate import evaluate
from training.extract import ExtractError, extract_dataset
from training.metrics import markdown_table
from training.prepare import (PRESETS, PrepareError, add_source_arguments, image_stream, prepare, prepared_records,
                              write_images)
from training.state import STATE_DIR, TrainingError
from training.train import BEST_DIR, Trainer

CONFIGS = Path(__file__).parent / "configs"
CONFIG_PREFIX = {"flickr30k": "f30k", "coco": "coco"}
# Published R@1 (image->text, text->image): the paper (arXiv:1911.09370).
PAPER_R1 = {"flickr30k": {"t2i": (76.4, 57.8), "i2t": (66.3, 53.8), "ensemble": (76.2, 60.5)},
            "coco": {"t2i": (75.4, 64.0)}}
FEATURE_BYTES = 36 * (2048 + 4) * 4  # one image's float32 features and boxes
# Assumptions, not measurements (no GPU was measured for this plan): marked as such in the plan.
ASSUMED_BUTD_IMAGES_PER_S = 10.0
ASSUMED_STEP_S = {"t2i": 0.15, "i2t": 0.10}
ASSUMED_EPOCHS = 15  # early stopping ends the reference's runs well before 30 epochs


class RecipeError(ValueError):
    """A stage that cannot go on; the message says what to do."""


class Recipe:
    """The stages of one dataset's run in ``out``; each ``run_*`` is skipped when its marker exists."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.prefix = CONFIG_PREFIX[args.dataset]

    # -- markers --

    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.out / "stages" / f"{stage}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def mark(self, stage: str, **record: Any) -> None:
        path = self.out / "stages" / f"{stage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8"))
        print(f"[recipe] stage {stage} done", file=sys.stderr, flush=True)

    def stage(self, name: str, run: Any) -> Any:
        if (record := self.done(name)) is not None:
            print(f"[recipe] stage {name}: done earlier, skipped", file=sys.stderr, flush=True)
            return record
        print(f"[recipe] stage {name}", file=sys.stderr, flush=True)
        return run()

    # -- stages --

    def run(self) -> None:
        a = self.args
        self.stage("prepare", lambda: self.mark("prepare", **prepare(
            a.dataset, self.out / "data", repo_id=a.repo_id, revision=a.revision, columns=dict(a.column),
            any_sizes=a.any_sizes)))
        self.stage("extract", self.extract)
        for head in ("t2i", "i2t"):
            self.stage(f"train-{head}", lambda head=head: self.train(head))
        reports = self.stage("evaluate", self.evaluate)
        if a.push:
            for head in ("t2i", "i2t"):
                self.stage(f"push-{head}", lambda head=head: self.push(head, reports[head]))
        self.stage("index", self.index)
        self.stage("space", self.space)
        print(f"[recipe] all stages done. Serve: ADAPT_CHECKPOINT={self.out / 't2i' / BEST_DIR} "
              f"ADAPT_GALLERY={self.out / 'index'} python app.py", file=sys.stderr)

    def extractor(self) -> BottomUpAttentionExtractor:
        options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in self.args.extractor_option)}
        return build_extractor(BottomUpAttentionExtractor.name, **options)

    def extract(self) -> None:
        prepared = json.loads((self.out / "data" / "prepared.json").read_text(encoding="utf-8"))
        extractor = self.extractor()
        results = extract_dataset(
            prepared_records(self.out / "data"), None, self.out / "features", extractor,
            batch_size=self.args.batch_size, show_progress=not self.args.quiet,
            images=lambda split, _: image_stream(prepared, split, extractor.max_pixels))
        self.mark("extract", splits={r.split: {"written": r.written, "skipped": r.skipped} for r in results})

    def train_config_args(self, head: str) -> tuple[Path, list[str]]:
        overrides = [f"data.path={self.out / 'features'}", f"train.out_dir={self.out / head}",
                     f"model.word_vectors={self.args.word_vectors}",
                     f"data.name={self.args.dataset} ({self.done('prepare')['settings']['source']}, "
                     "bottom-up-attention features)", *self.args.override]
        return CONFIGS / f"{self.prefix}_{head}.yaml", overrides

    def train(self, head: str) -> None:
        path, overrides = self.train_config_args(head)
        resume = (self.out / head / STATE_DIR).is_dir()
        gpus = torch.cuda.device_count()
        if gpus > 1:  # one process per GPU (training/distributed.py)
            command = ["torchrun", "--nproc_per_node", str(gpus), "-m", "training.train", "--config", str(path),
                       *overrides, *(["--resume"] if resume else [])]
            if subprocess.run(command, check=False).returncode != 0:
                raise RecipeError(f"training {head} stopped; rerun the command to continue it")
            finished = json.loads((self.out / head / STATE_DIR / "state.json").read_text())["progress"]["finished"]
        else:
            finished = Trainer(load_config(path, overrides), resume=resume).fit().finished
        if not finished:
            raise RecipeError(f"training {head} paused before it finished; rerun the command to continue it")
        self.mark(f"train-{head}", finished=finished)

    def evaluate(self) -> dict[str, Any]:
        split = load_split(self.out / "features", "test")
        folds = (1, 5) if self.args.dataset == "coco" else (1,)
        models = {head: AdaptModel.from_pretrained(str(self.out / head / BEST_DIR)) for head in ("t2i", "i2t")}
        reports = {}
        for name, chosen in (("t2i", ["t2i"]), ("i2t", ["i2t"]), ("ensemble", ["t2i", "i2t"])):
            reports[name] = {"checkpoints": [str(self.out / h / BEST_DIR) for h in chosen],
                             "data": str(self.out / "features"), "split": "test",
                             **evaluate([models[h] for h in chosen], split, folds, progress=not self.args.quiet)}
        folder = self.out / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        for name, report in reports.items():
            (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        table = comparison_table(self.args.dataset, reports)
        (folder / "table.md").write_text(table)
        print(table)
        self.mark("evaluate", **reports)
        return reports

    def push(self, head: str, report: dict[str, Any]) -> None:
        repo_id = f"{self.args.push}-{head}"
        url = push.publish(self.out / head / BEST_DIR, repo_id, token=self.args.token or os.environ.get("HF_TOKEN"),
                           datasets=[self.done("prepare")["settings"]["source"]], test_report=report)
        self.mark(f"push-{head}", repo_id=repo_id, url=url)

    def index(self) -> None:
        images = self.out / "test_images"
        write_images(self.done("prepare"), "test", images)  # thumbnails for the hits
        model = AdaptModel.from_pretrained(str(self.out / "t2i" / BEST_DIR))
        index = gallery.open_or_create(self.out / "index", model, gallery.DEFAULT_SHARD_SIZE, None, None)
        try:
            builder = gallery.index_features(index, self.out / "features", "test", images)
        finally:
            index.close()
        self.mark("index", images=len(index), skipped=len(builder.skipped))


    def space(self) -> None:
        pushed = self.done("push-t2i")
        checkpoint = pushed["repo_id"] if pushed else str(self.out / "t2i" / BEST_DIR)
        config = AdaptModel.from_pretrained(str(self.out / "t2i" / BEST_DIR)).config
        card = space_card(config, checkpoint, gallery=str(self.out / "index"),
                          datasets=[self.done("prepare")["settings"]["source"]])
        (self.out / "space").mkdir(exist_ok=True)
        atomic_write(self.out / "space" / "README.md", card.save)
        self.mark("space", readme="space/README.md", suggested_hardware=card.data.get("suggested_hardware"))


def comparison_table(dataset: str, reports: dict[str, dict[str, Any]]) -> str:
    """Markdown: each model's test metrics per protocol, and the paper's R@1 where published."""
    rows = {f"{name}, {protocol}": p["metrics"] for name, report in reports.items()
            for protocol, p in report["protocols"].items()}
    paper = "\n".join(f"- paper ADAPT-{name.upper() if name != 'ensemble' else 'ensemble'}: R@1 image->text "
                      f"{i2t}, text->image {t2i}" + (" (COCO 1K)" if dataset == "coco" else "")
                      for name, (i2t, t2i) in PAPER_R1[dataset].items())
    return f"{markdown_table(rows)}\n\nPublished (Wehrmann et al., AAAI 2020):\n{paper}\n"


def plan(dataset: str, push_to: str | None) -> str:
    """The stages with disk, time and GPU-hour estimates derived from the dataset's sizes."""
    preset = PRESETS[dataset]
    images = sum(preset.sizes.values())
    features_gb = images * FEATURE_BYTES / 1e9
    extract_h = images / ASSUMED_BUTD_IMAGES_PER_S / 3600
    config = load_config(CONFIGS / f"{CONFIG_PREFIX[dataset]}_t2i.yaml")
    # Extraction streams the dataset once per split when the split is a column (rows of all splits
    # are read and filtered), once in all when the Hub splits are the Karpathy splits.
    streamed = preset.download_gb * (len(preset.sizes) if preset.split_column else 1)
    rows = [("prepare", "captions only (parquet column projection), a few MB" if preset.parquet else
             f"{preset.download_gb:.1f} GB streamed (not parquet: images too), nothing written",
             "minutes" if preset.parquet else "download-bound", 0.0),
            ("extract", f"{features_gb:.1f} GB features written; {streamed:.1f} GB of images streamed",
             f"{extract_h:.1f} h", extract_h)]
    for head in ("t2i", "i2t"):
        batch = load_config(CONFIGS / f"{CONFIG_PREFIX[dataset]}_{head}.yaml").train.batch_size
        steps = ASSUMED_EPOCHS * math.ceil(preset.sizes["train"] * config.data.captions_per_image / batch)
        hours = steps * ASSUMED_STEP_S[head] / 3600
        rows.append((f"train-{head}", "< 1 GB (checkpoints, logs)", f"{hours:.1f} h ({steps:,} steps)", hours))
    rows += [("evaluate", "< 1 MB", "minutes", 0.1)]
    if push_to:
        rows += [("push", "uploads 2 checkpoints", "minutes", 0.0)]
    test_gb = preset.sizes["test"] * FEATURE_BYTES / 1e9
    rows += [("index", f"{test_gb:.2f} GB + the test split's image files (for thumbnails)", "minutes", 0.05),
             ("space", "a README", "seconds", 0.0)]
    lines = [f"Plan for {dataset} ({preset.repo_id}): ESTIMATES, not measurements", "",
             "| stage | disk | time | GPU-hours |", "|---|---|---|---|"]
    lines += [f"| {s} | {d} | {t} | {g:.1f} |" for s, d, t, g in rows]
    lines += ["", f"Total: about {features_gb + 1:.0f} GB of disk and {sum(r[3] for r in rows):.0f} GPU-hours "
              "on one GPU.", "",
              f"Assumptions: bottom-up-attention extraction at {ASSUMED_BUTD_IMAGES_PER_S:g} images/s on one GPU "
              "(not measured here); a training step of "
              + " / ".join(f"{h.upper()} {s} s" for h, s in ASSUMED_STEP_S.items())
              + f" with AMP; {ASSUMED_EPOCHS} of the 30 epochs before early stopping. Features: 36 x 2048 float32 "
              "and 36 boxes per image."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.recipe``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m training.recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="folder of the whole run")
    parser.add_argument("--push", metavar="OWNER/NAME", help="push the checkpoints to OWNER/NAME-t2i and -i2t")
    parser.add_argument("--token", help="Hub token with write access (default: $HF_TOKEN)")
    parser.add_argument("--word-vectors", default="glove-840b-300d",
                        help="frozen word vectors (default: the paper's GloVe 840B, from the Hub)")
    parser.add_argument("--override", action="append", default=[], metavar="section.key=value",
                        help="training config override for both models (repeatable)")
    parser.add_argument("--extractor-option", action="append", default=[], metavar="key=value",
                        help="bottom-up-attention extractor option, e.g. weights=FILE (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per extraction step")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--dry-run", action="store_true", help="print the plan with estimates and run nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(plan(args.dataset, args.push))
        return 0
    try:
        Recipe(args).run()
    except (RecipeError, PrepareError, ExtractError, ExtractorError, ConfigError, DatasetError, TrainingError,
            CheckpointError, GalleryIndexError, gallery.IndexBuildError, PermissionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
