"""Training on several processes: ``torchrun`` + DDP, with the loss over the global batch.

    torchrun --nproc_per_node 4 -m training.train --config training/configs/f30k_t2i.yaml

``train.batch_size`` stays the global batch: each global batch of
:class:`~training.data.DistinctImageBatches` is cut into one contiguous shard per process. A process
encodes its shard, then every process gathers all shards' encodings (regions, words padded to the
longest caption of the global batch, masks) and scores the whole global batch, so the hinge loss,
its hardest negatives and the heads' BatchNorm statistics are those of one process with the whole
batch. Gradients flow back to each shard through the gather (its backward sums every process's
gradient of the gathered tensor, as open_clip's ``gather_features`` with gradients), and DDP
averages the parameters' gradients: every process computes the same loss, so the average of the
summed encoder gradients and of the identical head gradients is the one-process gradient.

What N processes divide: data loading and the encoders (most of a CPU step). What each repeats:
the similarity of the ``b x b`` pairs (with the fused kernels a sixth (I2T) to a third (T2I) of a
CPU step at batch 128) and the optimiser step.

Backends: nccl on CUDA (one GPU per process, ``LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adapt import AdaptModel, TokenBatch

# Ranks other than 0 wait in a collective while rank 0 validates and saves: allow for a long one.
_TIMEOUT = datetime.timedelta(hours=2)
_SIGNALS = ("SIGINT", "SIGTERM")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: 0 to ``size - 1``; rank 0 writes checkpoints, logs, plots and the progress bar.
        size: number of processes (1 without ``torchrun``).
        local_rank: rank on this machine: the GPU a CUDA process uses.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The :class:`World` that ``torchrun`` describes in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def start(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group ``torchrun`` set up (nccl for CUDA, gloo for CPU), once.

    Returns the :class:`World` and the device this process trains on: ``cuda:LOCAL_RANK`` for CUDA.
    Without ``torchrun`` (one process) nothing is initialised and ``device`` is returned as is.
    """
    world = world_from_env()
    if world.size == 1:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
    return world, device


def stop() -> None:
    """Leave the process group, if this process joined one (after every rank is done)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _all_gather(local: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's ``local`` (same shape everywhere) as ``(world_size, *shape)``."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.stack(parts)


class _GatherWithGradient(torch.autograd.Function):
    """:func:`_all_gather` whose backward sums every rank's gradient of the gathered tensor and
    returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_gather(local, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def gather_rows(local: torch.Tensor, counts: list[int], group: Any = None) -> torch.Tensor:
    """Every rank's rows in rank order, differentiable back to ``local``.

    Args:
        local: ``(counts[rank], ...)``; the trailing shape is the same on every rank.
        counts: each rank's number of rows (shards may differ by one).
        group: the process group (default: all processes).

    Returns:
        ``(sum(counts), ...)``.
    """
    padding = local.new_zeros((max(counts) - len(local), *local.shape[1:]))
    stacked = _GatherWithGradient.apply(torch.cat([local, padding]), group)
    return torch.cat([stacked[rank, :count] for rank, count in enumerate(counts)])


def pad_tokens(tokens: TokenBatch, n_tokens: int) -> TokenBatch:
    """``tokens`` ``(n, t)`` padded at the end to ``(n, n_tokens)`` (id 0, mask False), the length
    one process would have padded the whole global batch to."""
    extra = n_tokens - tokens.ids.shape[1]
    return TokenBatch(torch.nn.functional.pad(tokens.ids, (0, extra)),
                      torch.nn.functional.pad(tokens.mask, (0, extra), value=False))


class GlobalBatchScores(nn.Module):
    """The model's ``(b, b)`` scores of the global batch, from this rank's shard.

    Args:
        model: the :class:`AdaptModel` being trained (its parameters are this module's).
        memory_budget_mb: as ``AdaptModel.forward``.
    """

    def __init__(self, model: AdaptModel, memory_budget_mb: float) -> None:
        super().__init__()
        self.model = model
        self.memory_budget_mb = memory_budget_mb
        # The gathers run inside DDP's backward: a group of their own keeps their collectives apart
        # from DDP's gradient all-reduces.
        self.group = dist.new_group()

    def forward(self, features: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
        """Scores ``(b, b)`` of the global batch.

        Args:
            features: ``(b_rank, n_regions, region_dim)``: this rank's shard.
            tokens: its ``b_rank`` captions, ``(b_rank, t_rank)``.
        """
        shape = torch.tensor([len(features), tokens.ids.shape[1]], device=features.device)
        shapes = _all_gather(shape, self.group).tolist()
        counts = [count for count, _ in shapes]
        tokens = pad_tokens(tokens, max(length for _, length in shapes))
        regions = self.model.encode_regions(features)
        words, mask = self.model.encode_text(tokens)
        # gloo gathers no bools: the mask travels as bytes.
        mask = gather_rows(mask.to(torch.uint8), counts, self.group).bool()
        return self.model.similarity(
            gather_rows(regions, counts, self.group), gather_rows(words, counts, self.group), mask,
            memory_budget_mb=self.memory_budget_mb,
        ).scores


def data_parallel(model: AdaptModel, memory_budget_mb: float, device: torch.device) -> DistributedDataParallel:
    """:class:`GlobalBatchScores` of ``model`` under DDP (parameters synchronised from rank 0)."""
    module = GlobalBatchScores(model, memory_budget_mb)
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def agreed_signal(received: str | None, device: torch.device) -> str | None:
    """The signal any rank received (``SIGINT`` / ``SIGTERM``), so that all stop at the same
    iteration; ``None`` if none did."""
    code = torch.tensor(_SIGNALS.index(received) + 1 if received else 0, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return _SIGNALS[int(code) - 1] if int(code) else None


def update_from_main(state: Any) -> None:
    """Give ``state`` (a picklable object, e.g. the run's ``Progress``) rank 0's attributes, in
    place: the objects that refer to it see the update."""
    box = [state]
    dist.broadcast_object_list(box, src=0)
    vars(state).update(vars(box[0]))


def rng_states(device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states in rank order, on every rank: ``"torch"`` (CPU) and, on CUDA,
    ``"cuda"`` (its own GPU's). Ranks draw different numbers where their shards differ (dropout on
    a shard of 7 pairs, not 8), so an exact resume restores each its own."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


class SilentLog:
    """The run log of ranks other than 0, which write nothing (rank 0 writes the run's logs)."""

    def write(self, kind: str, row: dict[str, Any]) -> None:
        """Drop a row."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""

    def plot(self, path: Any) -> None:
        """No plot."""
