"""The model card of a checkpoint: the training record kept in ``AdaptConfig.card`` and its README.md.

Training writes :func:`training_card` into the best checkpoint's config; :func:`model_card` renders
that record (and a test report, when publishing) as a Hub model card with YAML front matter. Both
``python -m training.train`` and ``python -m training.push`` write it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData, SpaceCard, SpaceCardData

from adapt import AdaptConfig
from training.config import TrainConfig
from training.data import Split
from training.metrics import markdown_table
from training.state import Progress

TAGS = ["adapt", "image-text-retrieval", "cross-modal-retrieval", "image-to-text", "text-to-image", "pytorch"]
PAPER = "https://arxiv.org/abs/1911.09370"
CITATION = """@inproceedings{wehrmann2020adaptive,
  title     = {Adaptive Cross-modal Embeddings for Image-Text Alignment},
  author    = {Wehrmann, J{\\^o}natas and Kolling, Camila and Barros, Rodrigo C.},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2020}
}"""
_VARIANTS = {"t2i": "ADAPT-T2I (the caption adapts the image regions)",
             "i2t": "ADAPT-I2T (the image adapts the caption's words)",
             "ensemble": "the ADAPT T2I + I2T ensemble (mean of both similarities)",
             "mean": "the mean-pooling baseline without ADAPT (cosine of the mean region and the mean word)"}

# The metrics a card's model-index lists, with their names on the Hub (``retrieval_metrics`` keys; in percent).
_INDEX_METRICS = {**{f"{d}_r{k}": f"{name} R@{k}" for d, name in (("i2t", "Image→Text"), ("t2i", "Text→Image"))
                     for k in (1, 5, 10)}, "rsum": "rsum"}

# Terms of the public datasets a card may name (matched in ``data.name``); others: the name itself.
_DATA_TERMS = {"flickr30k": "Flickr30k: non-commercial research use",
               "coco": "COCO: annotations CC BY 4.0, images under their Flickr licences"}


# Extractors too slow for a CPU Space: bottom-up attention costs tens of seconds per uploaded photo on
# 2 vCPU (README, "Bottom-up attention"), so a Space serving such a model asks for a GPU.
GPU_EXTRACTORS = ("bottom-up-attention",)
GPU_SPACE_HARDWARE = "t4-small"


def portable_path(path: str) -> str:
    """``path`` as a card may show it: never an absolute path of the machine that trained.

    A relative path stays as it is; an absolute one becomes relative to the working folder when it lies
    inside it (the repository a run was started from), else its last part (``/home/me/data/f30k`` ->
    ``f30k``). A card is published, and a local path tells a reader nothing but the trainer's home.
    """
    given = Path(path)
    if not given.is_absolute() and ".." not in given.parts:
        return given.as_posix()
    try:
        return given.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return given.resolve().name


def eval_results(test_report: dict[str, Any], *, dataset_id: str, dataset_name: str) -> list[EvalResult]:
    """The Hub's model-index entries of a test report: R@1/5/10 both ways and rsum for each protocol.

    Args:
        test_report: a ``python -m training.evaluate --json`` report (its ``split`` and ``protocols``).
        dataset_id: the Hub dataset id (e.g. ``nlphuji/flickr30k``), or the data's name when it has none.
        dataset_name: the data's name as a reader knows it (e.g. ``Flickr30k``).
    """
    protocols = test_report["protocols"]
    return [EvalResult(task_type="image-text-retrieval", task_name="Image-text retrieval", dataset_type=dataset_id,
                       dataset_name=dataset_name, dataset_split=test_report.get("split"), metric_type=key,
                       metric_name=name if len(protocols) == 1 else f"{name} ({protocol})",
                       metric_config=protocol, metric_value=round(float(p["metrics"][key]), 2))
            for protocol, p in protocols.items() for key, name in _INDEX_METRICS.items()]


def model_card(
    config: AdaptConfig,
    *,
    repo_id: str | None = None,
    license: str = "other",
    datasets: Sequence[str] = (),
    test_report: dict[str, Any] | None = None,
) -> str:
    """README.md for a checkpoint: Hub YAML front matter, then data, extractor, config and metrics.

    Args:
        config: the checkpoint's config; ``config.card`` (written by training) supplies the data
            and validation metrics.
        repo_id: the Hub repo, for the usage snippet.
        license: Hub licence id of the weights.
        datasets: Hub dataset ids for the metadata; the first one names the test data in the model-index.
        test_report: a ``python -m training.evaluate --json`` report, rendered as a table and listed in
            the metadata's model-index.
    """
    card = config.card or {}
    data, validation, training = card.get("data", {}), card.get("validation"), card.get("training")
    trained_on = data.get("name", "unknown")
    name = repo_id.split("/")[-1] if repo_id else "ADAPT image-text retrieval"
    dataset_id = datasets[0] if datasets else trained_on
    index = eval_results(test_report, dataset_id=dataset_id, dataset_name=data.get("name", dataset_id)
                         ) if test_report else None
    metadata = ModelCardData(library_name="adapt", license=license, tags=TAGS, datasets=list(datasets) or None,
                             metrics=["recall"], model_name=name if index else None, eval_results=index)
    source = repo_id or "path/to/checkpoint"
    variant = _VARIANTS.get(config.similarity, f"ADAPT ({config.similarity})")
    terms = next((t for key, t in _DATA_TERMS.items() if key in trained_on.lower()), trained_on)
    lines = [
        f"# {name}", "",
        f"{variant} for image-text retrieval, from Wehrmann et al., *Adaptive Cross-modal Embeddings for "
        f"Image-Text Alignment*, AAAI 2020 ([paper]({PAPER})), trained with the `adapt` library.",
        "",
        "## Use", "",
        "```python",
        "from adapt import AdaptModel",
        f'model = AdaptModel.from_pretrained("{source}")',
        "scores = model.score(region_features, captions).scores  # (n_images, n_captions)",
        "```", "",
        f"`region_features` is `(n_images, n_regions, {config.region_dim})`: it must come from the same region "
        "extractor as the training features (below); features of another detector silently ruin recall.", "",
        "## Region features", "",
    ]
    if config.extractor:
        lines += ["Extracted with (`config.extractor`, checked by the app before it scores):", "", "```json",
                  json.dumps(config.extractor, indent=2, sort_keys=True), "```"]
    else:
        lines += ["Trained on precomputed features of unknown origin (e.g. the SCAN / VSE \"precomp\" bottom-up-"
                  "attention features, 36 x 2048 per image). The checkpoint cannot extract such features from "
                  "new images by itself."]
    lines += ["", "## Training data", ""]
    if data:
        lines += [f"- dataset: {trained_on} (`{portable_path(data.get('path', '?'))}`, split "
                  f"`{data.get('train_split', 'train')}`)",
                  f"- {data.get('train_images', '?')} images, {data.get('train_captions', '?')} captions, "
                  f"{data.get('regions_per_image', '?')} regions per image"]
    else:
        lines += ["Not recorded in this checkpoint."]
    if training:
        optim = training.get("optim", {})
        lines += [f"- {training.get('optimizer', 'Adamax')}, lr {optim.get('lr')}, warm-up x{optim.get('warmup_start')}"
                  f" -> x{optim.get('warmup_end')} over {optim.get('warmup_iterations')} iterations, x"
                  f"{optim.get('decay_factor')} at {optim.get('decay_at')}, gradient clip {optim.get('grad_clip')}, "
                  f"batch {training.get('batch_size')}, hinge loss margin {training.get('loss', {}).get('margin')} "
                  f"(sum -> max of violations, eta {training.get('loss', {}).get('eta')})"]
    lines += ["", "## Architecture", "", "| | |", "|---|---|",
              f"| similarity | `{config.similarity}` (fovea lambda T2I {config.lambda_t2i}, I2T {config.lambda_i2t}) |",
              f"| joint space | {config.latent_size} |",
              f"| region features | {config.region_dim}-d |",
              f"| text encoder | `{config.text_encoder}`" + (
                  f", word vectors `{config.word_vectors}` + {config.word_dim}-d trainable, "
                  f"{len(config.vocab)} words |" if config.text_encoder == "gru"
                  else f" `{config.transformer_name}` |"),
              f"| normalisation | `{config.normalization}` |", "", "## Results", ""]
    if validation:
        lines += [f"Validation ({validation.get('split')}, {validation.get('images')} images, "
                  f"{validation.get('captions')} captions; best of training, iteration {validation.get('iteration')}):",
                  "", markdown_table({"validation": validation["metrics"]}), ""]
    if test_report:
        lines += [f"Test (`{test_report.get('split')}`; `python -m training.evaluate`):", "",
                  markdown_table({name: p["metrics"] for name, p in test_report["protocols"].items()}), ""]
    if not validation and not test_report:
        lines += ["No metrics recorded.", ""]
    lines += [
        "R@K in percent; ranks are 1-based; rsum is the sum of the six recalls. Image→Text ranks the captions of "
        "each image (its best own caption counts), Text→Image the images of each caption.", "",
        "## Intended use and limitations", "",
        "Research on image-text retrieval: ranking captions for an image, searching images by text, inspecting "
        "which regions or words the model attends to. The model only knows the English captions and image "
        f"distribution of its training data, {trained_on}, and what its pretrained networks know, inherits "
        "their biases, and is not meant for decisions about people, identification or surveillance.", "",
        "## Licence", "",
        f"Weights: `{license}`. The training images and captions keep their own terms — {terms}.", "",
        "## Citation", "", "```bibtex", CITATION, "```", ""]
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)))


def training_card(config: TrainConfig, train: Split, val: Split, progress: Progress,
                  metrics: dict[str, float]) -> dict[str, Any]:
    """The record of a run for ``AdaptConfig.card``: training data, validation and its metrics, optimiser."""
    return {
        "data": {"name": config.data.name, "path": portable_path(config.data.path),
                 "train_split": config.data.train_split,
                 "train_images": train.n_images, "train_captions": train.n_captions,
                 "regions_per_image": train.n_regions},
        "validation": {"split": config.data.val_split, "images": val.n_images, "captions": val.n_captions,
                       "iteration": progress.iteration, "epoch": progress.epoch, "metrics": metrics},
        "training": {"loss": dataclasses.asdict(config.loss), "optim": dataclasses.asdict(config.optim),
                     "batch_size": config.train.batch_size, "seed": config.train.seed, "optimizer": "Adamax"},
    }


def space_card(config: AdaptConfig, checkpoint: str, *, gallery: str | None = None,
               datasets: Sequence[str] = ()) -> SpaceCard:
    """The README of a Hugging Face Space that serves ``checkpoint`` (a Hub repo id or a folder) with
    this repository's ``app.py``: the Space's settings in its YAML header, and how to deploy it.

    The header asks for a GPU (``suggested_hardware``) when the model's extractor is one of
    :data:`GPU_EXTRACTORS`; ``gallery`` is the folder of a gallery index the Space serves.
    """
    extractor = (config.extractor or {}).get("name", "unknown")
    hardware = {"suggested_hardware": GPU_SPACE_HARDWARE} if extractor in GPU_EXTRACTORS else {}
    try:
        sdk_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:  # training without the app extra: the Space's default
        sdk_version = None
    on_hub = not Path(checkpoint).exists()
    data = SpaceCardData(title="ADAPT image-text retrieval", sdk="gradio", sdk_version=sdk_version,
                         python_version="3.11", app_file="app.py", license="apache-2.0",
                         models=[checkpoint] if on_hub else None, datasets=list(datasets) or None,
                         tags=TAGS, short_description="Rank captions for a photo, search photos by caption (ADAPT)",
                         **hardware)
    shown = checkpoint if on_hub else portable_path(checkpoint)
    variables = f"`ADAPT_CHECKPOINT={shown}`" + (f" and `ADAPT_GALLERY={Path(gallery).name}`" if gallery else "")
    steps = [
        "Copy the adapt repository's `app.py`, `app_logic.py`, `adapt/`, `checkpoints/`, `examples/` and "
        "`requirements.txt` next to this README (its header holds the Space's settings).",
        f"Add the gallery index folder `{Path(gallery).name}` (its thumbnails are inside it)." if gallery else None,
        f"In the Space's settings, set the variables {variables}.",
    ]
    hardware_line = (f"\nIts extractor ({extractor}) is too slow for a CPU Space, so the header asks for "
                     f"`{GPU_SPACE_HARDWARE}`.\n" if hardware else "")
    body = "\n".join(f"{i}. {step}" for i, step in enumerate((s for s in steps if s), 1))
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n\n# ADAPT image-text retrieval\n\n"
                     f"Serves `{shown}` ({extractor} regions) with ADAPT's app.\n{hardware_line}\n{body}\n")
