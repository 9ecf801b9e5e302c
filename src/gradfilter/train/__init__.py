"""Fine-tuning: prepare a model (filter + freeze the last N blocks) and a task-agnostic loop."""

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
    "accuracy",
    "cross_entropy",
    "evaluate",
    "prepare_model",
    "seed_everything",
    "train",
]
