"""Evidence for the planner: at one memory budget, fine-tune pretrained EfficientNet-Lite0 on
``digits`` with the planned config and with the best fixed "last N blocks at one radius" config
for each radius (the largest N whose predicted saved bytes fit the budget), same seed, same data
order, and compare validation accuracy.

    python benchmarks/plan_evidence.py --budget 33MB \\
        --out benchmarks/results/plan_evidence_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gradfilter.bench.machine import machine_info
from gradfilter.data import get_dataset
from gradfilter.models import create_model
from gradfilter.plan import make_plan, parse_bytes, predict, profile_model
from gradfilter.train.runner import finetune

MODEL = "tf_efficientnet_lite0"
RADII = (2, 4, 7)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--budget", default="33MB")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs", default="runs/plan_evidence")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    budget = parse_bytes(args.budget)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    splits = get_dataset("digits", image_size=args.image_size)
    torch.manual_seed(0)
    model = create_model(MODEL, splits.num_classes, pretrained=True)
    profile = profile_model(model, shape, RADII, model_name=MODEL, progress=True)
    fid_batch = next(iter(DataLoader(splits.train, batch_size=args.batch_size)))
    plan = make_plan(model, shape, RADII, memory_budget=budget, model_name=MODEL,
                     fidelity_batches=[fid_batch], profile=profile)
    runs = Path(args.runs)
    plan_path = plan.save(runs / "plan.json")
    print(plan.table(), flush=True)

    n = len(profile.blocks)
    configs = [("planned", plan.train_last, dict(plan.layers), plan.predicted_saved_bytes)]
    for r in RADII:
        fits = [k for k in range(1, n + 1) if predict(profile, [r] * k)[0] <= budget]
        if fits:
            k = max(fits)
            configs.append((f"last {k} r={r}", k, r, predict(profile, [r] * k)[0]))
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for label, k, radius, pred in configs:
            out = runs / f"seed{seed}" / label.replace(" ", "_").replace("=", "")
            m = finetune(model=MODEL, data="digits", out=out, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, method="gradfilter",
                         radius=radius, train_last=k, pretrained=True,
                         image_size=args.image_size, seed=seed, optimizer="adamw",
                         resume=(out / "checkpoint.pt").exists(), quiet=True)
            rows.append({"config": label, "seed": seed, "train_last": k,
                         "radius": radius if isinstance(radius, int) else "per block",
                         "val_accuracy": m["val_accuracy"],
                         "predicted_saved_bytes": pred,
                         "measured_saved_bytes": m["saved_activation_bytes"],
                         "step_time_ms": m["step_time_ms"], "load": os.getloadavg()[0]})
            r = rows[-1]
            print(f"seed {seed} {label:14s} acc {100 * r['val_accuracy']:.2f}%  saved "
                  f"{r['measured_saved_bytes'] / 1e6:.2f} MB (pred {pred / 1e6:.2f}, budget "
                  f"{budget / 1e6:.2f})  step {r['step_time_ms']:.0f} ms", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "budget_bytes": budget, "input_shape": list(shape), "epochs": args.epochs,
            "lr": args.lr, "plan": str(plan_path), "plan_blocks": plan.blocks, "rows": rows,
            "machine": machine_info("cpu")}, indent=1))


if __name__ == "__main__":
    main()
