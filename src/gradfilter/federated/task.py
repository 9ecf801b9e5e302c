"""What the server and every client build the same way from a run config: the prepared
(filtered + frozen) model, the data splits, a client's share, and the trainable parameters that
are the only thing exchanged."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import DatasetSplits, get_dataset
from ..models import create_model
from ..train.trainer import PrepareInfo, prepare_model
from .partition import dataset_labels, partition_indices

__all__ = [
    "EVAL_BATCH_SIZE",
    "build_model",
    "client_dataset",
    "load_splits",
    "load_trainable",
    "trainable_state",
    "val_loader",
]

EVAL_BATCH_SIZE = 256


@functools.lru_cache(maxsize=4)
def load_splits(data: str, image_size: int) -> DatasetSplits:
    """The data set (cached per process: a client process serves many rounds)."""
    splits = get_dataset(data, image_size=image_size)
    if splits.train is None or len(splits.train) == 0:
        raise ValueError(f"data set '{data}' has no training images")
    return splits


def build_model(cfg: Mapping[str, Any]) -> tuple[nn.Module, PrepareInfo]:
    """A fresh model for ``cfg``, filtered and frozen by :func:`prepare_model`. Seeded, so the
    server and every client start from identical weights (the head too)."""
    splits = load_splits(cfg["data"], cfg["image-size"])
    torch.manual_seed(cfg["seed"])
    model = create_model(cfg["model"], splits.num_classes, pretrained=cfg["pretrained"])
    n = min(cfg["batch-size"], len(splits.train))
    example = torch.stack([splits.train[i][0] for i in range(n)])
    return prepare_model(model, cfg["method"], cfg["radius"], cfg["train-last"], example,
                         lean=cfg["lean"] or None)


def client_dataset(cfg: Mapping[str, Any], partition_id: int, num_partitions: int) -> Dataset:
    """Client ``partition_id``'s share of the training split (recomputed identically by every
    client from the labels and the seed)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in 0..{num_partitions - 1}")
    train = load_splits(cfg["data"], cfg["image-size"]).train
    parts = _partition(cfg["data"], cfg["image-size"], num_partitions, cfg["partition"],
                       cfg["seed"])
    return Subset(train, parts[partition_id].tolist())


@functools.lru_cache(maxsize=4)
def _partition(data: str, image_size: int, num: int, spec: str, seed: int) -> list:
    labels = dataset_labels(load_splits(data, image_size).train)
    return partition_indices(labels, num, spec, seed)


def val_loader(cfg: Mapping[str, Any]) -> DataLoader:
    """The held-out split the server evaluates the global model on."""
    splits = load_splits(cfg["data"], cfg["image-size"])
    if splits.val is None or len(splits.val) == 0:
        raise ValueError(f"data set '{cfg['data']}' has no validation split to evaluate on")
    return DataLoader(splits.val, batch_size=EVAL_BATCH_SIZE)


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters that require grad (the trained blocks and the head), detached, by name.
    Everything else (the frozen prefix, BatchNorm statistics kept in eval mode) never changes
    and therefore never travels."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into ``model``'s trainable parameters; the names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"received parameters do not fit the model's trainable ones "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, p in params.items():
        value = state[name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"parameter {name}: received shape {tuple(value.shape)}, model "
                             f"has {tuple(p.shape)}")
        p.copy_(value.to(p.device, p.dtype))
