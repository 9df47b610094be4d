"""Publish a checkpoint on the Hugging Face Hub, with a generated model card.

    python -m training.push runs/f30k_t2i/best --repo-id you/f30k-t2i --metrics test.json --dataset nlphuji/flickr30k
    python -m training.push runs/f30k_t2i/best --repo-id you/adapt-f30k-t2i --dry-run upload/

The folder that is uploaded holds ``config.json`` and ``model.safetensors`` (re-saved from the
loaded checkpoint, so it is known to load) and a README.md with Hub metadata (library_name
``adapt``, licence, tags, datasets, and, with ``--metrics``, the test results as a model-index:
R@1/5/10 both ways and rsum on the test split, under the first ``--dataset`` id) and the training
data, region extractor, architecture and metrics. ``AdaptModel.from_pretrained("you/adapt-f30k-t2i")``
and the app load it. The token comes from ``--token`` or ``HF_TOKEN``. ``--dry-run DIR`` writes
exactly that folder and uploads nothing; a real push stages the same folder in a temporary
directory and uploads it with ``HfApi.upload_folder``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import HfApi

from adapt import AdaptModel, CheckpointError
from training.card import model_card


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
    """``python -m training.push``; returns the exit status (argument errors exit with 2)."""
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
