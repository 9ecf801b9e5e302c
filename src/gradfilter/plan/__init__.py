"""Planner: which blocks to train and each conv's radius under a memory / time budget."""

from .planner import (
    FORMAT,
    Plan,
    apply_plan,
    load_plan,
    make_plan,
    parse_bytes,
    parse_ms,
    predict,
)
from .profile import BlockCost, CostProfile, profile_model

__all__ = [
    "FORMAT",
    "BlockCost",
    "CostProfile",
    "Plan",
    "apply_plan",
    "load_plan",
    "make_plan",
    "parse_bytes",
    "parse_ms",
    "predict",
    "profile_model",
]
