"""Which fidelity score predicts accuracy? Fine-tune pretrained EfficientNet-Lite0 on ``digits``
(the evidence protocol of docs/planner.md §4) for every fixed "last N blocks at radius r"
config, and rank the configs by each candidate planner score, measured once on the planner's
fidelity batch. Reports, per score, the rank correlation with the mean accuracy and the regret
of picking the best-scoring config under a memory budget (for each config's saved bytes as the
budget: best accuracy that fits minus the accuracy of the best-scoring one that fits).

    python benchmarks/reproduce/plan_score_study.py --out benchmarks/results/plan_score_study.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import torch
from plan_evidence import MODEL, _grids  # same folder
from torch.utils.data import DataLoader

from gradfilter.data import get_dataset
from gradfilter.diagnostics import block_transmission, inspect
from gradfilter.machine import machine_info
from gradfilter.models import create_model
from gradfilter.plan import predict, profile_model
from gradfilter.plan.planner import FIDELITY_BATCH, _Costs
from gradfilter.train.runner import finetune

SCORES = ("cos", "cos_path", "descent", "descent_path")


def _scorers(profile, rows, trans) -> dict[str, _Costs]:
    """The candidate scores as the planner's own objective (``_Costs``) over different
    per-conv fidelities, with and without the transmission path weight."""
    cos = {(r.layer, r.radius): max(0.0, r.cos_weight) for r in rows
           if not math.isnan(r.cos_weight)}
    dsc = {(r.layer, r.radius): min(1.0, max(0.0, r.descent_weight)) for r in rows
           if not math.isnan(r.descent_weight)}
    path = {k: max(0.0, v) for k, v in trans.items()}
    return {"cos": _Costs(profile, cos), "cos_path": _Costs(profile, cos, path),
            "descent": _Costs(profile, dsc), "descent_path": _Costs(profile, dsc, path)}


def _kendall(xs: list[float], ys: list[float]) -> float:
    num = den = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            s = (xs[i] - xs[j]) * (ys[i] - ys[j])
            if s != 0:
                num += 1 if s > 0 else -1
                den += 1
    return num / den if den else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-last", type=int, default=12)
    p.add_argument("--radii", default="2,4")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--runs", default="runs/plan_score_study")
    p.add_argument("--out", default="benchmarks/results/plan_score_study.json")
    args = p.parse_args()
    radii = tuple(int(r) for r in args.radii.split(","))
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    splits = get_dataset("digits", image_size=args.image_size)
    torch.manual_seed(0)
    model = create_model(MODEL, splits.num_classes, pretrained=True)
    profile = profile_model(model, shape, radii, model_name=MODEL, repeats=0)
    x, y = next(iter(DataLoader(splits.train, batch_size=args.batch_size)))
    batch = [(x[:FIDELITY_BATCH], y[:FIDELITY_BATCH])]
    convs = [c for b in profile.blocks for c in b.convs]
    rep = inspect(model, batch, layers=convs, radii=radii)
    trans = block_transmission(model, batch, [b.name for b in profile.blocks], radii)
    scorers = _scorers(profile, rep.rows, trans)
    n_blocks = len(profile.blocks)
    grids = _grids(model, shape)
    configs = []
    for k in range(1, args.max_last + 1):
        for r in radii:
            blocks = profile.blocks[-k:]
            key = (k, tuple(sorted((c, grids[c](r)) for b in blocks for c in b.convs
                                   if c in grids)))
            if any(c["key"] == key for c in configs):
                continue  # same patch grids as a smaller radius: the same training run
            configs.append({"key": key, "train_last": k, "radius": r,
                            "predicted_saved_bytes": predict(profile, [r] * k)[0],
                            **{name: sc.objective(dict.fromkeys(range(n_blocks - k, n_blocks), r))
                               for name, sc in scorers.items()}})
    runs = Path(args.runs)
    for c in configs:
        accs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            out = runs / f"seed{seed}" / f"last_{c['train_last']}_r{c['radius']}"
            m = finetune(model=MODEL, data="digits", out=out, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, method="filtered",
                         radius=c["radius"], train_last=c["train_last"], pretrained=True,
                         image_size=args.image_size, seed=seed, optimizer="adamw",
                         resume=(out / "checkpoint.pt").exists(), quiet=True)
            accs.append(m["val_accuracy"])
        c["val_accuracy"] = accs
        c["mean"] = statistics.mean(accs)
        c["load"] = os.getloadavg()[0]
        print(f"last {c['train_last']:2d} r={c['radius']}: acc {100 * c['mean']:.2f}%  saved "
              f"{c['predicted_saved_bytes'] / 1e6:.1f} MB  "
              + "  ".join(f"{s} {c[s]:.2f}" for s in SCORES), flush=True)
    summary = {}
    means = [c["mean"] for c in configs]
    for s in SCORES:
        regrets = []
        for budget in sorted({c["predicted_saved_bytes"] for c in configs}):
            fit = [c for c in configs if c["predicted_saved_bytes"] <= budget]
            pick = max(fit, key=lambda c: (c[s], -c["predicted_saved_bytes"]))
            regrets.append(max(c["mean"] for c in fit) - pick["mean"])
        summary[s] = {"kendall_tau": _kendall([c[s] for c in configs], means),
                      "mean_regret_pt": 100 * statistics.mean(regrets),
                      "max_regret_pt": 100 * max(regrets)}
        print(f"{s:13s} tau {summary[s]['kendall_tau']:+.3f}  regret mean "
              f"{summary[s]['mean_regret_pt']:.2f} pt, max {summary[s]['max_regret_pt']:.2f} pt")
    for c in configs:
        c.pop("key")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "protocol": vars(args), "configs": configs, "summary": summary,
        "transmission": {f"{k[0]}@{k[1]}": v for k, v in trans.items()},
        "machine": machine_info("cpu")}, indent=1))


if __name__ == "__main__":
    main()
