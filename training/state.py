"""The training state: everything an exact resume needs, saved without pickle, and what may change.

``out_dir/training_state/`` holds ``tensors.safetensors`` (model weights, optimiser tensors, the
loss's iteration, RNG states: under torchrun every rank's) and ``state.json`` (progress, the run's
config, the model config, the optimiser's JSON skeleton, the gradient scaler). A folder is written beside its final place and
swapped in, so a crash never leaves a half-written one behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapt import AdaptModel, HingeLoss
from adapt.config import field_differences
from training.config import TrainConfig

STATE_DIR = "training_state"
# Keys that may differ between a saved run and the config it is resumed with: they change how long
# or where the run goes, not what one iteration computes.
RESUMABLE_CHANGES = {"train.max_iterations", "train.epochs", "train.early_stop", "train.workers",
                     "train.device", "train.progress", "train.out_dir", "data.path"}


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


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


def replace_dir(staged: Path, final: Path) -> None:
    """Swap a fully written folder in, so a crash never leaves a half-written one behind."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    if old.exists():
        shutil.rmtree(old)


def fresh_dir(path: Path) -> Path:
    """``path`` as a new empty folder (whatever was there is deleted)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_training_state(out_dir: Path, config: TrainConfig, progress: Progress, model: AdaptModel,
                        criterion: HingeLoss, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler,
                        rank_rng: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Write ``out_dir/training_state`` (replacing the previous one once the new one is complete).

    ``rank_rng``: under torchrun, each rank's RNG states (``"torch"``, and ``"cuda"`` for its GPU),
    saved as ``rng.rank<r>.<kind>`` beside this process's own.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors["loss.iteration"] = criterion.iteration
    optimizer_tensors, optimizer_skeleton = _optimizer_state(optimizer)
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for rank, states in enumerate(rank_rng or []):
        tensors.update({f"rng.rank{rank}.{kind}": state for kind, state in states.items()})
    state = {"progress": dataclasses.asdict(progress), "config": config.to_dict(),
             "model_config": model.config.to_dict(), "optimizer": optimizer_skeleton,
             "scaler": scaler.state_dict()}
    staged = fresh_dir(out_dir / (STATE_DIR + ".tmp"))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staged / "tensors.safetensors"))
    (staged / "state.json").write_text(json.dumps(state, indent=1))
    replace_dir(staged, out_dir / STATE_DIR)


def read_training_state(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` saved in ``out_dir/training_state`` (or its ``.old`` copy after a crash)."""
    folder = out_dir / STATE_DIR
    if not folder.is_dir() and folder.with_name(STATE_DIR + ".old").is_dir():
        folder = folder.with_name(STATE_DIR + ".old")
    if not (folder / "state.json").is_file():
        raise TrainingError(f"nothing to resume: no {STATE_DIR}/state.json in {out_dir}")
    return load_file(str(folder / "tensors.safetensors")), json.loads((folder / "state.json").read_text())


def restore_training_state(tensors: dict[str, torch.Tensor], state: dict[str, Any], model: AdaptModel,
                           criterion: HingeLoss, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, rank: int = 0,
                           device: torch.device | None = None) -> None:
    """Load what :func:`read_training_state` returned into the live objects, RNG states included:
    under torchrun those ``rank`` saved (its GPU's on ``device``), where the state has them."""
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    criterion.iteration.copy_(tensors["loss.iteration"])
    _restore_optimizer(optimizer, tensors, state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors.get(f"rng.rank{rank}.torch", tensors["rng.torch"]))
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    if f"rng.rank{rank}.cuda" in tensors and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.rank{rank}.cuda"], device)


def check_resumable(saved: TrainConfig, given: TrainConfig) -> None:
    """Refuse to resume a run with a config that changes what an iteration computes.

    Raises:
        TrainingError: naming each changed key with its saved and new value.
    """
    def flat(config: TrainConfig) -> dict[str, Any]:
        return {f"{section}.{key}": value for section, values in config.to_dict().items()
                for key, value in values.items()}

    old, new = ({k: v for k, v in flat(config).items() if k not in RESUMABLE_CHANGES} for config in (saved, given))
    changed = field_differences(old, new, ("saved", "now"))
    if changed:
        raise TrainingError(f"cannot resume with a different config ({'; '.join(changed)}). Only "
                            f"{sorted(RESUMABLE_CHANGES)} may change on resume")
