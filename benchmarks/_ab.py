"""Shared pieces of the in-process A/B benchmarks: the fused cases, one training batch, and
writing a result file with the machine it ran on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gradfilter.bench.machine import machine_info

# MobileNetV2's and EfficientNet-Lite0's last 4 / last 8 blocks: the cases fused blocks change
FUSED_CASES = [("mobilenet_v2", 4), ("mobilenet_v2", 8), ("tf_efficientnet_lite0", 4),
               ("tf_efficientnet_lite0", 8)]


def step_batch(batch: int = 16, size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    """The step benchmark's seeded batch: ImageNet-sized images and labels."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, size, size, generator=gen),
            torch.randint(0, 1000, (batch,), generator=gen))


def save(out: Path | None, rows: list[dict], **extra) -> None:
    """Write ``{"machine", **extra, "rows"}`` as JSON to ``out`` (nothing without one)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine_info(), **extra, "rows": rows}, indent=1))
