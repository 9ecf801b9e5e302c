"""``gradfilter plan``: build a named model, plan it for an input shape and budgets, write
``plan.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .planner import Plan, make_plan


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"16,3,224,224"`` -> (16, 3, 224, 224)."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise ValueError(f"--input-shape must be B,C,H,W positive ints, got {text!r}")
    return shape  # type: ignore[return-value]


def run_plan(
    *,
    model: str,
    input_shape: Sequence[int],
    out: str | Path,
    memory_budget: str | None = None,
    time_budget: str | None = None,
    radii: Sequence[int] = (2, 4, 7),
    num_classes: int = 10,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    data: str | None = None,
    repeats: int = 3,
    quiet: bool = False,
    seed: int = 0,
) -> Plan:
    """Plan ``model``; fidelity from the first batch of ``data`` (random inputs without it).

    ``seed`` fixes what is random here (a model without weights, the synthetic batch), so the
    same command plans the same fidelities; only the timings vary."""
    import torch

    from ..models import create_model

    torch.manual_seed(seed)

    batches = loss_fn = None
    if data is not None:
        from torch.utils.data import DataLoader

        from ..data import get_dataset
        from ..train.metrics import task_for

        splits = get_dataset(data, image_size=int(input_shape[-1]), split="train")
        num_classes = splits.num_classes
        loss_fn = task_for(model, splits.task, num_classes, splits.ignore_index).loss_fn
        batches = [next(iter(DataLoader(splits.train, batch_size=int(input_shape[0]))))]
    net = create_model(model, num_classes, pretrained=pretrained, checkpoint=checkpoint)
    plan = make_plan(net, input_shape, radii=radii, memory_budget=memory_budget,
                     time_budget_ms=time_budget, model_name=model, fidelity_batches=batches,
                     repeats=max(1, repeats), progress=not quiet, loss_fn=loss_fn)
    path = plan.save(out)
    print(plan.table())
    print(f"wrote {path}")
    return plan
