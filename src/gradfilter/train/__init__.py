"""Fine-tuning: prepare a model (filter + freeze the last N blocks) and a task-agnostic loop."""

from .metrics import SegmentationMetric, Task, segmentation_loss, task_for
from .trainer import (
    METHODS,
    PrepareInfo,
    accuracy,
    cross_entropy,
    evaluate,
    prepare_model,
    seed_everything,
    train,
)

__all__ = [
    "METHODS",
    "PrepareInfo",
    "SegmentationMetric",
    "Task",
    "accuracy",
    "cross_entropy",
    "evaluate",
    "prepare_model",
    "seed_everything",
    "segmentation_loss",
    "task_for",
    "train",
]
