"""The logs of a training run: CSV rows (and TensorBoard scalars when installed) and the curves' plot.

``out_dir/train_log.csv`` has one row per iteration (:data:`TRAIN_FIELDS`), ``val_log.csv`` one per
validation (:data:`VAL_FIELDS`); ``training_curves.png`` plots both, ``tensorboard/`` mirrors them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from training.metrics import DIRECTIONS, METRICS

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
        """Append a row to the ``"train"`` or ``"val"`` log (and its numbers to TensorBoard)."""
        self.writers[kind].writerow(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("iteration", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, row["iteration"])

    def flush(self) -> None:
        """Put every row written so far on disk."""
        for f in self.files.values():
            f.flush()
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        """Close the log files and the TensorBoard writer."""
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
