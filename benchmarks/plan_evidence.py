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
from gradfilter.diagnostics import _geometry2d
from gradfilter.models import create_model
from gradfilter.plan import load_plan, make_plan, parse_bytes, predict, profile_model
from gradfilter.surgery import _trace, conv_layers
from gradfilter.train.runner import finetune

MODEL = "tf_efficientnet_lite0"
RADII = (2, 4, 7)


def _grids(model: torch.nn.Module, shape: tuple[int, ...]) -> dict:
    """conv name -> (radius -> where its output and input patches start, real pixels only).
    Two radii with the same partitions filter identically (e.g. r=4 and r=7 on a 4x4 map)."""
    convs = dict(conv_layers(model))
    traced = _trace(model, convs, torch.zeros(*shape))

    def partition(name: str, r: int) -> tuple:
        in_s, out_s, _ = traced[name]
        gh, gw, _, _ = _geometry2d(convs[name], in_s, out_s, r)
        return tuple(
            (tuple(max(0, i * g.radius - g.out_pad) for i in range(g.patches)),
             tuple(min(g.size, max(0, i * g.in_patch - g.in_pad)) for i in range(g.patches)))
            for g in (gh, gw))

    return {n: (lambda r, n=n: partition(n, r)) for n in traced}


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
    runs = Path(args.runs)
    plan_path = runs / "plan.json"
    if plan_path.exists():  # a resumed evidence run: same plan, saved bytes re-profiled only
        plan = load_plan(plan_path)
        profile = profile_model(model, shape, RADII, model_name=MODEL, repeats=0)
    else:
        profile = profile_model(model, shape, RADII, model_name=MODEL, progress=True)
        fid_batch = next(iter(DataLoader(splits.train, batch_size=args.batch_size)))
        plan = make_plan(model, shape, RADII, memory_budget=budget, model_name=MODEL,
                         fidelity_batches=[fid_batch], profile=profile)
        plan.save(plan_path)
    print(plan.table(), flush=True)

    n = len(profile.blocks)
    configs = [("planned", plan.train_last, dict(plan.layers), plan.predicted_saved_bytes)]
    for r in RADII:
        fits = [k for k in range(1, n + 1) if predict(profile, [r] * k)[0] <= budget]
        if fits:
            k = max(fits)
            configs.append((f"last {k} r={r}", k, r, predict(profile, [r] * k)[0]))
    grids = _grids(model, shape)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        done: dict[tuple, dict] = {}
        for label, k, radius, pred in configs:
            blocks = [b.name for b in profile.blocks[-k:]]
            radii = radius if isinstance(radius, dict) else {
                c: radius for b in profile.blocks[-k:] for c in b.convs}
            # the same patch grid on every conv is the same training run: reuse its result
            key = (tuple(blocks), tuple(sorted((c, grids[c](r)) for c, r in radii.items())))
            if key in done:
                rows.append({**done[key], "config": label, "radius": radius,
                             "same_run_as": done[key]["config"]})
                print(f"seed {seed} {label:14s} = {done[key]['config']} (same patch grids)")
                continue
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
            done[key] = r
            print(f"seed {seed} {label:14s} acc {100 * r['val_accuracy']:.2f}%  saved "
                  f"{r['measured_saved_bytes'] / 1e6:.2f} MB (pred {pred / 1e6:.2f}, budget "
                  f"{budget / 1e6:.2f})  step {r['step_time_ms']:.0f} ms", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "budget_bytes": budget, "input_shape": list(shape), "epochs": args.epochs,
            "lr": args.lr, "plan": str(plan_path), "plan_blocks": plan.blocks, "rows": rows,
            "seeds": args.seeds,
            "machine": machine_info("cpu")}, indent=1))


if __name__ == "__main__":
    main()
