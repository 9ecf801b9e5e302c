"""Multi-process data-parallel fine-tuning under ``torchrun``: what ``gradfilter finetune``
needs to run as one of ``WORLD_SIZE`` processes.

``torchrun --nproc-per-node N -m gradfilter.cli finetune ...`` starts N processes with
``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` set; each trains on its 1/N shard of every epoch
through :class:`torch.nn.parallel.DistributedDataParallel` (gradients are averaged, so the
update is the one of the global batch ``N x --batch-size``), and only rank 0 writes the
checkpoint and the metrics. Filtered layers need nothing special: DDP averages the gradients
their backward produces like any other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["DistInfo", "EpochSampler", "init_from_env", "shutdown", "wrap"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str | torch.device = "cpu") -> DistInfo | None:
    """Join the process group that ``torchrun``'s environment describes (gloo on CPU, NCCL on
    CUDA); ``None`` when this is a plain single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group (the CLI, at the end of a torchrun run): every rank waits for
    the others first, since tearing the group down while a peer still uses it aborts that peer."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, device: str | torch.device) -> nn.Module:
    """``model`` (already prepared and on ``device``) under DDP; only trainable parameters are
    synchronised (frozen ones never change)."""
    device = torch.device(device)
    model.to(device)
    ids = [device.index if device.index is not None else info.local_rank] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


class EpochSampler(DistributedSampler):
    """A ``DistributedSampler`` that moves to the next epoch's shuffle by itself each time it
    is iterated (the trainer's loop does not call ``set_epoch``)."""

    def __init__(self, dataset: Dataset, info: DistInfo, seed: int, drop_last: bool,
                 start_epoch: int = 0) -> None:
        super().__init__(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                         seed=seed, drop_last=drop_last)
        self._next_epoch = start_epoch

    def __iter__(self) -> Iterator[int]:
        self.set_epoch(self._next_epoch)
        self._next_epoch += 1
        return super().__iter__()
