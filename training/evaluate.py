"""Evaluate checkpoints on a precomp split with the standard protocol; JSON and Markdown reports.

Every image and every caption is encoded once, in batches; ``model.similarity`` then scores all
pairs in memory-bounded blocks. Several checkpoints are an ensemble: their score matrices are
averaged (the paper's T2I + I2T ensemble). ``--folds 1 5`` on COCO's ``testall`` gives 5K and 1K.

    python -m training.evaluate --checkpoint runs/f30k_t2i/best --data data/f30k_precomp --split test
    python -m training.evaluate --checkpoint runs/coco_t2i/best --checkpoint runs/coco_i2t/best \\
        --data data/coco_precomp --split testall --folds 1 5 --json coco.json --markdown coco.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from adapt import AdaptModel, CheckpointError, pick_device
from adapt.regions import ExtractorMismatchError, check_extractor
from adapt.similarity import DEFAULT_MEMORY_BUDGET_MB
from training.data import CAPTIONS_PER_IMAGE, DatasetError, Split, load_split
from training.metrics import fold_slices, markdown_table, mean_metrics, retrieval_metrics

IMAGE_BATCH = 256
CAPTION_BATCH = 1000
EXTRACT_AGAIN = ("Extract the split again with the extractor the checkpoint names (python -m training.extract), "
                 "or evaluate a checkpoint trained on these features.")


@torch.no_grad()
def score_matrix(
    model: AdaptModel,
    split: Split,
    *,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    progress: bool = True,
) -> torch.Tensor:
    """All ``(n_images, n_captions)`` scores of a split, on the CPU, in eval mode.

    Images are encoded once, in batches of :data:`IMAGE_BATCH`; captions are encoded in chunks of
    :data:`CAPTION_BATCH` (sorted by length, so little padding) and each chunk is scored against all
    images. In eval mode BatchNorm uses its running statistics, so chunking does not change a score.
    """
    was_training = model.training
    model.eval()
    try:
        regions = torch.cat([
            model.encode_regions(split.region_features(slice(i, i + IMAGE_BATCH)))
            for i in range(0, split.n_images, IMAGE_BATCH)
        ])
        order = np.argsort([len(c) for c in split.captions], kind="stable")
        scores = torch.empty(split.n_images, split.n_captions)
        chunks = range(0, split.n_captions, CAPTION_BATCH)
        for start in tqdm(chunks, desc=f"scoring {split.name}", unit="chunk", disable=not progress, leave=False):
            columns = order[start : start + CAPTION_BATCH]
            words, mask = model.encode_text([split.captions[c] for c in columns])
            chunk = model.similarity(regions, words, mask, memory_budget_mb=memory_budget_mb).scores
            scores[:, torch.from_numpy(columns)] = chunk.float().cpu()
        return scores
    finally:
        model.train(was_training)


def ensemble_scores(models: Sequence[AdaptModel], split: Split, **kwargs: Any) -> torch.Tensor:
    """Mean of the models' score matrices (one model: its own)."""
    return sum(score_matrix(m, split, **kwargs) for m in models) / len(models)


def evaluate(
    models: Sequence[AdaptModel],
    split: Split,
    folds: Sequence[int] = (1,),
    **kwargs: Any,
) -> dict[str, Any]:
    """Metrics of an ensemble on ``split`` for each fold count.

    Args:
        models: one checkpoint, or several whose score matrices are averaged.
        split: the evaluation split (e.g. Flickr30k ``test``, COCO ``testall``).
        folds: 1 is the whole split (COCO 5K); 5 is the mean of 5 folds (COCO 1K). Only the
            within-fold blocks are scored unless 1 is asked for too.
        kwargs: passed to :func:`score_matrix`.

    Returns:
        ``{"n_images", "n_captions", "protocols": {name: {"metrics": {...}, "folds": [...]}}}``.
    """
    k = split.captions_per_image
    full = ensemble_scores(models, split, **kwargs) if 1 in folds else None
    protocols = {}
    for n_folds in folds:
        per_fold = []
        for images, captions in fold_slices(split.n_images, n_folds, k):
            scores = (full[images, captions] if full is not None
                      else ensemble_scores(models, split.images(images.start, images.stop), **kwargs))
            per_fold.append(retrieval_metrics(scores, k))
        name = f"{split.n_images} images" if n_folds == 1 else f"{n_folds} folds of {split.n_images // n_folds} images"
        protocols[name] = {"metrics": mean_metrics(per_fold), **({"folds": per_fold} if n_folds > 1 else {})}
    return {"n_images": split.n_images, "n_captions": split.n_captions, "protocols": protocols}


def to_markdown(report: dict[str, Any]) -> str:
    """A short Markdown report: what was evaluated, then the metrics table."""
    lines = [f"**Checkpoints:** {', '.join(f'`{c}`' for c in report['checkpoints'])}",
             f"**Data:** `{report['data']}` split `{report['split']}` ({report['n_images']} images, "
             f"{report['n_captions']} captions)", "",
             markdown_table({name: p["metrics"] for name, p in report["protocols"].items()})]
    return "\n".join(lines) + "\n"


def load_checkpoint(reference: str, device: torch.device | str = "cpu") -> AdaptModel:
    """A checkpoint from a local folder, or from the Hub when ``reference`` is not a local path."""
    if not Path(reference).exists() and (reference.startswith((".", "/", "~")) or reference.count("/") != 1):
        raise CheckpointError(f"checkpoint {reference!r}: no such folder (and not a Hub id 'owner/name')")
    return AdaptModel.from_pretrained(reference, map_location=device)


def check_features(model: AdaptModel, split: Split, name: str) -> None:
    """Refuse features the model was not trained on: other size, or another region extractor."""
    if model.config.region_dim != split.region_dim:
        raise DatasetError(f"{split}: features are {split.region_dim}-d but {name} expects "
                           f"{model.config.region_dim}-d region features")
    if model.config.extractor and split.extractor:
        try:
            check_extractor(model.config.extractor, split.extractor, names=("checkpoint", "features"),
                            advice=EXTRACT_AGAIN)
        except ExtractorMismatchError as e:
            raise DatasetError(f"{split}: features come from extractor {split.extractor} but {name} was trained "
                               f"on features of {model.config.extractor}.\n{e}") from e


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="DIR_OR_HUB_ID",
                        help="a checkpoint folder or Hub id; repeat to evaluate the ensemble (mean scores)")
    parser.add_argument("--data", required=True, type=Path, help="dataset folder in the precomp layout")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test; COCO: testall)")
    parser.add_argument("--folds", type=int, nargs="+", default=[1],
                        help="fold counts: 1 = whole split, 5 = mean of 5 folds (COCO 1K); default 1")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images (and their captions)")
    parser.add_argument("--captions-per-image", type=int, default=CAPTIONS_PER_IMAGE)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--memory-budget-mb", type=float, default=DEFAULT_MEMORY_BUDGET_MB,
                        help="bound on the pair tensors alive at once while scoring (default 256)")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the report as Markdown here")
    args = parser.parse_args(argv)

    try:
        split = load_split(args.data, args.split, args.captions_per_image)
        if args.max_images:
            split = split.images(0, min(args.max_images, split.n_images))
        device = torch.device(args.device) if args.device else pick_device()
        models = [load_checkpoint(c, device) for c in args.checkpoint]
        for name, model in zip(args.checkpoint, models, strict=True):
            check_features(model, split, name)
        report = {"checkpoints": list(args.checkpoint), "data": str(args.data), "split": args.split,
                  **evaluate(models, split, args.folds, memory_budget_mb=args.memory_budget_mb)}
    except (DatasetError, CheckpointError, ValueError, OSError) as e:
        parser.error(str(e))

    markdown = to_markdown(report)
    print(markdown)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
