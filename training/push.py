"""Publish a checkpoint on the Hugging Face Hub, with a generated model card.

    python -m training.push runs/f30k_t2i/best --repo-id you/adapt-f30k-t2i --metrics f30k_test.json
    python -m training.push runs/f30k_t2i/best --repo-id you/adapt-f30k-t2i --dry-run upload/

The folder that is uploaded holds ``config.json`` and ``model.safetensors`` (re-saved from the
loaded checkpoint, so it is known to load) and a README.md with Hub metadata (library_name
``adapt``, licence, tags, datasets, metrics) and the training data, region extractor, architecture
and metrics. ``AdaptModel.from_pretrained("you/adapt-f30k-t2i")`` and the app load it. The token
comes from ``--token`` or ``HF_TOKEN``. ``--dry-run DIR`` writes exactly that folder and uploads
nothing; a real push stages the same folder in a temporary directory and uploads it with
``HfApi.upload_folder``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import HfApi, ModelCard, ModelCardData

from adapt import AdaptConfig, AdaptModel, CheckpointError
from training.metrics import markdown_table

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
        datasets: Hub dataset ids for the metadata.
        test_report: a ``python -m training.evaluate --json`` report.
    """
    card = config.card or {}
    data, validation, training = card.get("data", {}), card.get("validation"), card.get("training")
    metadata = ModelCardData(library_name="adapt", license=license, tags=TAGS, datasets=list(datasets) or None,
                             metrics=["recall"])
    source = repo_id or "path/to/checkpoint"
    variant = _VARIANTS.get(config.similarity, f"ADAPT ({config.similarity})")
    lines = [
        f"# {repo_id.split('/')[-1] if repo_id else 'ADAPT image-text retrieval'}", "",
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
        lines += [f"- dataset: {data.get('name', 'unknown')} (`{data.get('path', '?')}`, split "
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
        "distribution it was trained on (Flickr30k / COCO photos are mostly everyday scenes from Western "
        "photographers), inherits their biases, and is not meant for decisions about people, identification "
        "or surveillance.", "",
        "## Licence", "",
        f"Weights: `{license}`. The training images and captions keep their own terms (Flickr30k: non-commercial "
        "research use; COCO: annotations CC BY 4.0, images under their Flickr licences).", "",
        "## Citation", "", "```bibtex", CITATION, "```", ""]
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)))


def stage(
    checkpoint: str | Path,
    folder: Path,
    *,
    repo_id: str,
    license: str = "other",
    datasets: Sequence[str] = (),
    test_report: dict[str, Any] | None = None,
) -> Path:
    """Write the folder to upload: the checkpoint re-saved (its card updated) and its README.md."""
    if not Path(checkpoint).is_dir():
        raise CheckpointError(f"checkpoint folder {checkpoint} does not exist")
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; choose an empty or new folder")
    model = AdaptModel.from_pretrained(str(checkpoint))
    if test_report:
        model.config.card = {**model.config.card, "test": {
            "split": test_report.get("split"),
            "protocols": {name: p["metrics"] for name, p in test_report["protocols"].items()}}}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "README.md").write_text(
        model_card(model.config, repo_id=repo_id, license=license, datasets=datasets, test_report=test_report),
        encoding="utf-8")
    return folder


def upload(folder: Path, repo_id: str, *, token: str, private: bool = False,
           commit_message: str = "Upload ADAPT checkpoint") -> str:
    """Create the model repo if needed and upload ``folder``; returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def publish(
    checkpoint: str | Path,
    repo_id: str,
    *,
    token: str | None,
    dry_run: Path | None = None,
    private: bool = False,
    commit_message: str = "Upload ADAPT checkpoint",
    **card: Any,
) -> str:
    """Stage the upload folder (in ``dry_run``, or a temporary folder) and upload it unless dry-running.

    ``card``: :func:`stage`'s keyword arguments (licence, datasets, test report).
    """
    if dry_run is not None:
        stage(checkpoint, dry_run, repo_id=repo_id, **card)
        return f"dry run: the folder that would be uploaded to {repo_id} is {dry_run}"
    if not token:
        raise PermissionError("no Hub token: pass --token or set HF_TOKEN (a token with write access)")
    with tempfile.TemporaryDirectory(prefix="adapt-push-") as tmp:
        folder = stage(checkpoint, Path(tmp) / "upload", repo_id=repo_id, **card)
        return upload(folder, repo_id, token=token, private=private, commit_message=commit_message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.push", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder, e.g. runs/f30k_t2i/best")
    parser.add_argument("--repo-id", required=True, help="Hub model repo, owner/name")
    parser.add_argument("--token", help="Hub token with write access (default: $HF_TOKEN)")
    parser.add_argument("--metrics", type=Path, help="test metrics: a `python -m training.evaluate --json` report")
    parser.add_argument("--license", default="other",
                        help="Hub licence id of the weights (default: other; mind the data's terms)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id for the card (repeatable)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--commit-message", default="Upload ADAPT checkpoint")
    parser.add_argument("--dry-run", type=Path, metavar="DIR",
                        help="write the folder that would be uploaded to DIR and upload nothing")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.metrics.read_text()) if args.metrics else None
        if report is not None and "protocols" not in report:
            raise ValueError(f"{args.metrics}: not a `python -m training.evaluate --json` report")
        print(publish(args.checkpoint, args.repo_id, token=args.token or os.environ.get("HF_TOKEN"),
                      dry_run=args.dry_run, private=args.private, commit_message=args.commit_message,
                      license=args.license, datasets=args.dataset, test_report=report))
    except (CheckpointError, OSError, ValueError, PermissionError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
