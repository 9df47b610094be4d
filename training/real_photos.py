"""The real-photo check: is a model right on photos of the kind people upload?

``training/real_photos.json`` (installed with the package) lists real photos that Python and
Debian packages ship (scikit-image, scikit-learn, matplotlib, Debian's ``opencv-doc`` and
``tuxpaint-stamps-default``), each with one plain caption written by looking at the photo before
any model saw it. No image is stored in this repository: each entry names its source package and a
path inside it (``file.avi#N`` is frame ``N`` of a video). Its ``select`` half may be used to
choose models; its ``holdout`` half never is.

Usage::

    python -m training.real_photos [--checkpoint checkpoints/default] [--directions t2i i2t] [--misses]

prints R@1 / R@5 both ways for each half and for the whole set (image->text: each photo ranks all
the set's captions; text->image: each caption ranks all its photos). ``--conse`` scores the
zero-shot ConSE reference instead of a model; ``--misses`` also lists each photo whose caption or
photo is not ranked first, with what was ranked first instead.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from adapt.pipeline import Retriever
from adapt.regions import Regions, load_image
from adapt.resources import installed_path
from checkpoints import DEFAULT_CHECKPOINT
from training.metrics import retrieval_metrics

DEFAULT_SET = Path(__file__).with_name("real_photos.json")
SPLITS = ("select", "holdout")


# Where each source keeps its photos; None when the package is not installed.
SOURCES: dict[str, Callable[[], Path | None]] = {
    "skimage": lambda: installed_path("skimage", "data"),
    "scikit-learn": lambda: installed_path("sklearn", "datasets", "images"),
    "matplotlib": lambda: installed_path("matplotlib", "mpl-data", "sample_data"),
    "opencv-doc": lambda: Path("/usr/share/doc/opencv-doc/examples/data"),
    "tuxpaint": lambda: Path("/usr/share/tuxpaint/stamps"),
}
INSTALL_HINTS = {
    "skimage": "pip install scikit-image",
    "scikit-learn": "pip install scikit-learn",
    "matplotlib": "pip install matplotlib",
    "opencv-doc": "apt-get install opencv-doc",
    "tuxpaint": "apt-get install tuxpaint-stamps-default",
}


@dataclass(frozen=True)
class RealPhoto:
    """One photo of the set: where it lives, its caption and its half."""

    source: str
    path: str
    caption: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.source}:{self.path}"

    def file(self) -> Path | None:
        """The photo's file, or ``None`` when its source package is not installed."""
        folder = SOURCES[self.source]()
        file = None if folder is None else folder / self.path.split("#")[0]
        return file if file is not None and file.is_file() else None

    def load(self) -> Image.Image:
        """The photo as an RGB image (a video entry decodes its frame with OpenCV)."""
        file = self.file()
        if file is None:
            raise FileNotFoundError(f"{self.name}: not installed ({INSTALL_HINTS[self.source]})")
        if "#" not in self.path:
            return load_image(file)
        import cv2

        capture = cv2.VideoCapture(str(file))
        capture.set(cv2.CAP_PROP_POS_FRAMES, int(self.path.split("#")[1]))
        ok, frame = capture.read()
        capture.release()
        if not ok:
            raise FileNotFoundError(f"{self.name}: OpenCV could not read that frame")
        return Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]))


def read_set(path: str | Path = DEFAULT_SET) -> list[RealPhoto]:
    """Every photo the set lists, installed or not."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))["photos"]
    return [RealPhoto(e["source"], e["path"], e["caption"], e["split"]) for e in entries]


def installed(photos: Sequence[RealPhoto]) -> tuple[list[RealPhoto], list[str]]:
    """The photos whose package is installed, and an install hint for each missing source."""
    present = [p for p in photos if p.file() is not None]
    missing = sorted({p.source for p in photos} - {p.source for p in present})
    return present, [f"{s} ({INSTALL_HINTS[s]})" for s in missing]


def real_photo_scores(
    retriever: Retriever,
    photos: Sequence[RealPhoto],
    directions: tuple[str, ...] | None = None,
    regions: Sequence[Regions] | None = None,
) -> torch.Tensor:
    """The ``(n_photos, n_photos)`` photo x caption scores of a model on ``photos``.

    Args:
        retriever: the model with its region extractor.
        photos: the photos (installed ones; see :func:`installed`).
        directions: the model's scoring directions to use (default: its own kind).
        regions: precomputed regions of ``photos`` (default: extracted now).
    """
    if regions is None:
        regions = [retriever.regions(p.load())[1] for p in photos]
    features = torch.from_numpy(np.stack([r.features for r in regions]))
    return retriever.model.score(features, [p.caption for p in photos], directions=directions).scores.cpu()


def split_metrics(scores: torch.Tensor, photos: Sequence[RealPhoto]) -> dict[str, dict[str, float]]:
    """R@1/5/10 both ways for each half of ``photos`` and for all of them.

    Args:
        scores: ``(n_photos, n_photos)`` photo x caption scores (:func:`real_photo_scores`).
        photos: the photos, in the order of the rows and columns.

    Returns:
        ``{"select": metrics, "holdout": metrics, "all": metrics}`` with
        :func:`training.metrics.retrieval_metrics` keys (one caption per photo), and each part's
        photo count under ``"n"``.
    """
    out = {}
    for part in (*SPLITS, "all"):
        index = [i for i, p in enumerate(photos) if part in ("all", p.split)]
        if index:
            chosen = torch.tensor(index)
            out[part] = {**retrieval_metrics(scores[chosen][:, chosen], captions_per_image=1), "n": len(index)}
    return out


@torch.inference_mode()
def conse_reference_scores(photos: Sequence[RealPhoto], top_k: int = 10) -> torch.Tensor:
    """The zero-shot ConSE reference, with no training at all: ``(n_photos, n_photos)`` scores.

    Each whole photo (224 x 224, EfficientNet-Lite0's training size) gets its ImageNet class
    probabilities; the ``top_k`` weight all-MiniLM-L6-v2's embeddings of "a photo of a {class}", and
    the cosine with each caption's MiniLM embedding is the score (Norouzi et al., ICLR 2014).
    """
    from adapt.concepts import conse, default_concepts, embed_names
    from adapt.encoders import TransformerTextEncoder
    from adapt.regions.ssd import efficientnet_lite0

    backbone = efficientnet_lite0().eval()
    text = TransformerTextEncoder("sentence-transformers/all-MiniLM-L6-v2", latent_size=1)
    names = embed_names(text, [f"a photo of a {c}" for c in default_concepts()["classes"]])
    pixels = torch.stack([torch.from_numpy(np.array(p.load().resize((224, 224), Image.BILINEAR)))
                          for p in photos]).permute(0, 3, 1, 2).float()
    probs = torch.softmax(backbone((pixels - 127.0) / 128.0), dim=-1)
    images = torch.nn.functional.normalize(conse(probs, names, top_k), dim=-1)
    return images @ embed_names(text, [p.caption for p in photos]).T


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A small plain-text table of :func:`split_metrics` output."""
    lines = ["part       photos  image->text R@1  R@5    text->image R@1  R@5"]
    for part, m in metrics.items():
        lines.append(f"{part:10s} {int(m['n']):6d}  {m['i2t_r1']:15.1f}  {m['i2t_r5']:5.1f}  "
                     f"{m['t2i_r1']:15.1f}  {m['t2i_r5']:5.1f}")
    return "\n".join(lines)


def misses(scores: torch.Tensor, photos: Sequence[RealPhoto]) -> list[str]:
    """One line per photo not ranked first on the whole set, either way, with what won instead.

    Args:
        scores: ``(n_photos, n_photos)`` photo x caption scores (:func:`real_photo_scores`).
        photos: the photos, in the order of the rows and columns.
    """
    true = scores.diagonal()
    caption_ranks = (scores > true[:, None]).sum(1) + 1  # of each photo's caption, among all captions
    photo_ranks = (scores > true[None, :]).sum(0) + 1  # of each caption's photo, among all photos
    lines = []
    for i, photo in enumerate(photos):
        if caption_ranks[i] == 1 and photo_ranks[i] == 1:
            continue
        lines.append(f"{photo.split} {photo.name}: \"{photo.caption}\" caption rank {int(caption_ranks[i])}, "
                     f"photo rank {int(photo_ranks[i])}")
        if caption_ranks[i] > 1:
            lines.append(f"    first caption: \"{photos[int(scores[i].argmax())].caption}\"")
        if photo_ranks[i] > 1:
            lines.append(f"    first photo: {photos[int(scores[:, i].argmax())].name}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="model folder or Hub id")
    parser.add_argument("--set", default=str(DEFAULT_SET), help="the photo list (JSON)")
    parser.add_argument("--directions", nargs="+", choices=("t2i", "i2t", "mean"),
                        help="scoring directions (default: the model's own)")
    parser.add_argument("--conse", action="store_true",
                        help="score the zero-shot ConSE reference instead of a model (no training)")
    parser.add_argument("--misses", action="store_true",
                        help="also list each photo whose caption or photo is not ranked first")
    args = parser.parse_args(argv)
    photos, missing = installed(read_set(args.set))
    if missing:
        print("skipping photos of sources not installed: " + ", ".join(missing))
    if not photos:
        print("no photo of the set is installed")
        return 1
    if args.conse:
        scores = conse_reference_scores(photos)
    else:
        retriever = Retriever.from_pretrained(args.checkpoint)
        directions = tuple(args.directions) if args.directions else None
        scores = real_photo_scores(retriever, photos, directions)
    print(format_metrics(split_metrics(scores, photos)))
    if args.misses:
        print("\n".join(misses(scores, photos)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
