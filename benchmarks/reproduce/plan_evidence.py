"""Evidence for the planner: at several memory budgets, fine-tune pretrained EfficientNet-Lite0
on ``digits`` with the planned config and compare it with every fixed "last N blocks at one
radius" config that fits the same budget (their runs come from ``plan_score_study.py``, same
protocol, seeds and data order; run that first).

    python benchmarks/reproduce/plan_score_study.py
    python benchmarks/reproduce/plan_evidence.py --out benchmarks/results/plan_evidence_cpu.json

Prints one row per budget: the plan, its accuracy (mean ± std over seeds), the best fixed config
that fits (best by measured mean accuracy: the strongest possible comparator) and the largest
fixed N at r=2 and at r=4 that fits (what a user without a planner would pick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gradfilter.data import get_dataset
from gradfilter.diagnostics import conv_geometry
from gradfilter.machine import machine_info
from gradfilter.models import create_model
from gradfilter.plan import make_plan, parse_bytes, profile_model
from gradfilter.selection import trace
from gradfilter.surgery import conv_layers
from gradfilter.train.runner import finetune

MODEL = "tf_efficientnet_lite0"
RADII = (2, 4, 7)


def _grids(model: torch.nn.Module, shape: tuple[int, ...]) -> dict:
    """conv name -> (radius -> where its output and input patches start, real pixels only).
    Two radii with the same partitions filter identically (e.g. r=4 and r=7 on a 4x4 map)."""
    convs = dict(conv_layers(model))
    traced = trace(model, convs, torch.zeros(*shape))

    def partition(name: str, r: int) -> tuple:
        in_s, out_s, _ = traced[name]
        gh, gw, _, _ = conv_geometry(convs[name], in_s, out_s, r)
        return tuple(
            (tuple(max(0, i * g.radius - g.out_pad) for i in range(g.patches)),
             tuple(min(g.size, max(0, i * g.in_patch - g.in_pad)) for i in range(g.patches)))
            for g in (gh, gw))

    return {n: (lambda r, n=n: partition(n, r)) for n in traced}


def _stats(accs: list[float]) -> tuple[float, float]:
    return 100 * statistics.mean(accs), 100 * (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def _plot(fixed: list[dict], rows: list[dict], path: Path) -> Path:
    """Accuracy vs saved bytes: the fixed configs (one line per radius) and the plans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, marker in ((2, "o"), (4, "s")):
        cs = sorted((c for c in fixed if c["radius"] == r), key=lambda c: c["train_last"])
        ax.errorbar([c["predicted_saved_bytes"] / 1e6 for c in cs],
                    [100 * c["mean"] for c in cs],
                    yerr=[_stats(c["val_accuracy"])[1] for c in cs], marker=marker,
                    capsize=2, alpha=0.6, label=f"fixed last N, r={r}")
    ax.errorbar([r["plan_saved_bytes"] / 1e6 for r in rows], [r["plan_mean"] for r in rows],
                yerr=[r["plan_std"] for r in rows], fmt="*", color="k", markersize=11,
                capsize=2, label="planned (one per budget)")
    for r in rows:
        ax.axvline(r["budget_bytes"] / 1e6, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("saved for backward per step (MB)")
    ax.set_ylabel("val accuracy % (mean ± std over seeds)")
    ax.set_title("Lite0 on digits 64 px: planned vs fixed configs (dotted: budgets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--budgets", default="12MB,17MB,24MB,30MB,33MB,40MB,45MB")
    p.add_argument("--study", default="benchmarks/results/plan_score_study.json")
    p.add_argument("--runs", default="runs/plan_evidence")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    study = json.loads(Path(args.study).read_text())
    proto = study["protocol"]
    seeds = [int(s) for s in proto["seeds"].split(",")]
    shape = (proto["batch_size"], 3, proto["image_size"], proto["image_size"])
    splits = get_dataset("digits", image_size=proto["image_size"])
    torch.manual_seed(0)
    model = create_model(MODEL, splits.num_classes, pretrained=True)
    profile = profile_model(model, shape, RADII, model_name=MODEL, repeats=0)
    fid_batch = next(iter(DataLoader(splits.train, batch_size=proto["batch_size"])))
    grids = _grids(model, shape)
    fixed = study["configs"]
    for c in fixed:
        blocks = profile.blocks[-c["train_last"]:]
        c["key"] = (c["train_last"], tuple(sorted((n, grids[n](c["radius"]))
                                                  for b in blocks for n in b.convs if n in grids)))
    rows = []
    for budget_text in args.budgets.split(","):
        budget = parse_bytes(budget_text)
        plan = make_plan(model, shape, RADII, memory_budget=budget, model_name=MODEL,
                         fidelity_batches=[fid_batch], profile=profile)
        plan.save(Path(args.runs) / f"plan_{budget_text}.json")
        k = plan.train_last
        key = (k, tuple(sorted((n, grids[n](r)) for n, r in plan.layers.items() if n in grids)))
        same = next((c for c in fixed if c["key"] == key), None)
        if same is not None and len(same["val_accuracy"]) == len(seeds):
            accs = same["val_accuracy"]
        else:
            accs = []
            for seed in seeds:
                out = Path(args.runs) / f"seed{seed}" / f"plan_{budget_text}"
                m = finetune(model=MODEL, data="digits", out=out, epochs=proto["epochs"],
                             batch_size=proto["batch_size"], lr=proto["lr"],
                             method="filtered", radius=dict(plan.layers), train_last=k,
                             pretrained=True, image_size=proto["image_size"], seed=seed,
                             optimizer="adamw", resume=(out / "checkpoint.pt").exists(),
                             quiet=True)
                accs.append(m["val_accuracy"])
        fits = [c for c in fixed if c["predicted_saved_bytes"] <= budget]
        best = max(fits, key=lambda c: c["mean"])
        naive = {r: max((c for c in fits if c["radius"] == r), key=lambda c: c["train_last"],
                        default=None) for r in (2, 4)}
        mean, std = _stats(accs)
        row = {
            "budget": budget_text, "budget_bytes": budget, "plan_train_last": k,
            "plan_radii": [b["radius"] for b in plan.blocks],
            "plan_saved_bytes": plan.predicted_saved_bytes,
            "plan_same_as_fixed": None if same is None else
            f"last {same['train_last']} r={same['radius']}",
            "plan_val_accuracy": accs, "plan_mean": mean, "plan_std": std,
            "best_fixed": f"last {best['train_last']} r={best['radius']}",
            "best_fixed_mean": 100 * best["mean"],
            "best_fixed_std": _stats(best["val_accuracy"])[1],
            "naive": {r: None if c is None else {"config": f"last {c['train_last']} r={r}",
                                                 "mean": 100 * c["mean"]}
                      for r, c in naive.items()},
            "load": os.getloadavg()[0],
        }
        row["delta_vs_best_pt"] = mean - row["best_fixed_mean"]
        rows.append(row)
        print(f"{budget_text:>5s}: plan last {k} r={row['plan_radii']} {mean:.2f} ± {std:.2f}"
              f"  | best fixed {row['best_fixed']} {row['best_fixed_mean']:.2f} ± "
              f"{row['best_fixed_std']:.2f}  | Δ {row['delta_vs_best_pt']:+.2f} pt", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "protocol": proto, "seeds": seeds, "rows": rows, "machine": machine_info("cpu")},
            indent=1))
        print(f"wrote {args.out} and {_plot(fixed, rows, Path(args.out).with_suffix('.png'))}")


if __name__ == "__main__":
    main()
