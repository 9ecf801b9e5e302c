"""Task-specific losses and metrics for the task-agnostic trainer, and the choice between them.

Segmentation: pixel-wise cross-entropy that skips the ignore label, and mIoU / pixel accuracy
from a confusion matrix accumulated over the whole validation set (a stateful metric: IoU does
not average over batches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .trainer import accuracy, cross_entropy

__all__ = ["SegmentationMetric", "Task", "segmentation_loss", "task_for"]


class SegmentationMetric:
    """Confusion matrix over all labelled pixels; ``compute()`` returns mIoU.

    mIoU is the mean IoU over the classes that occur in the targets or the predictions
    (a class absent from both has no IoU); ``pixel_accuracy()`` is the fraction of labelled
    pixels predicted right. Pixels equal to ``ignore_index`` are left out of both.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """``outputs``: N x C x H x W logits; ``targets``: N x H x W class indices."""
        pred = outputs.argmax(dim=1).flatten().cpu()
        true = targets.flatten().cpu().long()
        keep = true != self.ignore_index if self.ignore_index is not None else slice(None)
        pred, true = pred[keep], true[keep]
        if true.numel() and (true.min() < 0 or true.max() >= self.num_classes):
            raise ValueError(f"target class {int(true.max())} outside 0..{self.num_classes - 1} "
                             f"(and not the ignore label {self.ignore_index})")
        k = self.num_classes
        self.confusion += torch.bincount(true * k + pred, minlength=k * k).reshape(k, k)

    def iou(self) -> Tensor:
        """Per-class IoU (NaN for a class absent from targets and predictions)."""
        c = self.confusion.double()
        inter = c.diag()
        union = c.sum(0) + c.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.nan)

    def compute(self) -> float:
        return float(self.iou().nanmean()) if self.confusion.sum() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(self.confusion.diag().sum() / total) if total else float("nan")


def segmentation_loss(ignore_index: int | None) -> Callable[[Tensor, Tensor], Tensor]:
    """Pixel-wise mean cross-entropy over the labelled pixels."""
    index = -100 if ignore_index is None else ignore_index

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, ignore_index=index)

    return loss


@dataclass
class Task:
    """What the trainer needs to know about a task: its loss, metric and metric's name."""

    name: str
    loss_fn: Callable[[Any, Any], Tensor]
    metric_fn: Any
    metric_name: str


def task_for(model_name: str, task: str, num_classes: int,
             ignore_index: int | None = None) -> Task:
    """The loss and metric for ``task`` (a data set's ``DatasetSplits.task``), checking that
    the model ``model_name`` fits it."""
    from ..models.segmentation import is_segmentation_model, list_segmentation_models

    seg_model = is_segmentation_model(model_name)
    if task == "segmentation":
        if not seg_model:
            raise ValueError(f"model '{model_name}' is not a segmentation model, but the data "
                             "set is a segmentation set; known segmentation models: "
                             f"{', '.join(list_segmentation_models())}")
        return Task(task, segmentation_loss(ignore_index),
                    SegmentationMetric(num_classes, ignore_index), "miou")
    if task == "classification":
        if seg_model:
            raise ValueError(f"'{model_name}' is a segmentation model, but the data set is a "
                             "classification set; use synthetic-seg, voc:PATH or cityscapes:PATH")
        return Task(task, cross_entropy, accuracy, "accuracy")
    raise ValueError(f"unknown task {task!r}")
