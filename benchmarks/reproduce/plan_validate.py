"""Validate the planner's predictions: plan under a memory budget, apply the plan to a fresh
model, and measure what the trainer measures (bytes autograd saves in the first step, median
step time after two warm-up steps) on random batches of the planned shape.

    python benchmarks/reproduce/plan_validate.py --out benchmarks/results/plan_validate_cpu.json

Accepted error: saved bytes within 10 %, step time within 25 %.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from gradfilter.machine import machine_info
from gradfilter.models import create_model
from gradfilter.plan import apply_plan, make_plan
from gradfilter.train import train

BUDGETS = {"mobilenet_v2": "8MB", "resnet18": "6MB", "tf_efficientnet_lite0": "8MB"}


def validate(name: str, shape: tuple[int, ...], budget: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name, 10, pretrained=name == "tf_efficientnet_lite0")
    plan = make_plan(model, shape, radii=(2, 4, 7), memory_budget=budget, model_name=name)
    print(plan.table(), flush=True)
    net = create_model(name, 10, pretrained=name == "tf_efficientnet_lite0")
    x = torch.randn(steps * shape[0], *shape[1:])
    y = torch.randint(0, 10, (steps * shape[0],))
    apply_plan(net, plan, x[: shape[0]])
    loader = DataLoader(TensorDataset(x, y), batch_size=shape[0])
    m = train(net, loader, None, epochs=1, lr=1e-6, optimizer="adamw", progress=False)
    row = {
        "model": name, "input_shape": list(shape), "memory_budget": budget,
        "train_last": plan.train_last, "radii": [b["radius"] for b in plan.blocks],
        "predicted_saved_bytes": plan.predicted_saved_bytes,
        "measured_saved_bytes": m["saved_activation_bytes"],
        "analytic_conv_only_bytes": plan.analytic_conv_saved_bytes,
        "predicted_step_ms": plan.predicted_step_ms, "measured_step_ms": m["step_time_ms"],
        "load_before": os.getloadavg()[0],
    }
    row["saved_error"] = row["predicted_saved_bytes"] / row["measured_saved_bytes"] - 1
    row["step_error"] = row["predicted_step_ms"] / row["measured_step_ms"] - 1
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default=",".join(BUDGETS))
    p.add_argument("--input-shape", default="8,3,128,128")
    p.add_argument("--steps", type=int, default=8, help="measured training steps")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shape = tuple(int(s) for s in args.input_shape.split(","))
    rows = []
    for name in args.models.split(","):
        rows.append(validate(name, shape, BUDGETS[name], args.steps))
        r = rows[-1]
        print(f"{name}: saved {r['predicted_saved_bytes'] / 1e6:.2f} MB predicted vs "
              f"{r['measured_saved_bytes'] / 1e6:.2f} MB measured ({100 * r['saved_error']:+.1f}%)"
              f"; step {r['predicted_step_ms']:.0f} ms vs {r['measured_step_ms']:.0f} ms "
              f"({100 * r['step_error']:+.1f}%); load {r['load_before']:.1f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {"rows": rows, "machine": machine_info("cpu")}, indent=1))


if __name__ == "__main__":
    main()
