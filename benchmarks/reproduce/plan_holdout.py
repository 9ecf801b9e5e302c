"""Held-out check of the planner evidence: plan vs the best fixed config on fresh seeds.

``plan_evidence.py`` compares each plan with the fixed "last N at one radius" config that scored
best on the *same* five seeds among the ~10 that fit the budget. That maximum over noisy means is
biased upwards (the winner's curse: on digits one validation image is 0.28 pt). Here the config
chosen there and the plan are both re-run on seeds they were not chosen on (default 5-14, same
protocol), and the paired difference (same seed = same head init and data order) is reported
with a 95% t-interval.

    python benchmarks/reproduce/plan_score_study.py
    python benchmarks/reproduce/plan_evidence.py --out benchmarks/results/plan_evidence_cpu.json
    python benchmarks/reproduce/plan_holdout.py --out benchmarks/results/plan_holdout_cpu.json

Rule, fixed before running: the plan *matches* the best fixed config at a budget when the 95%
interval of the paired held-out difference (plan minus fixed) reaches 0 or above; it *loses* when
the whole interval is below 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

from scipy import stats
from tqdm import tqdm

from gradfilter.files import write_json_atomic
from gradfilter.machine import machine_info
from gradfilter.plan import load_plan
from gradfilter.train.runner import finetune

MODEL = "tf_efficientnet_lite0"


def _run(proto: dict, out: Path, seed: int, radius, train_last: int) -> float:
    m = finetune(model=MODEL, data="digits", out=out, epochs=proto["epochs"],
                 batch_size=proto["batch_size"], lr=proto["lr"], method="filtered",
                 radius=radius, train_last=train_last, pretrained=True,
                 image_size=proto["image_size"], seed=seed, optimizer="adamw",
                 resume=(out / "checkpoint.pt").exists(), quiet=True)
    return 100 * m["val_accuracy"]


def paired(plan: list[float], fixed: list[float]) -> dict:
    """Mean paired difference plan - fixed and its two-sided 95% t-interval."""
    d = [a - b for a, b in zip(plan, fixed, strict=True)]
    mean = statistics.mean(d)
    half = (stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
            if len(d) > 1 else math.inf)
    return {"diffs": d, "mean": mean, "ci95": [mean - half, mean + half],
            "verdict": "matches" if mean + half >= 0 else "loses"}


def plot(rows: list[dict], path: Path) -> Path:
    """Paired held-out difference (plan - best fixed) per budget, with its 95% interval, and
    the same difference on the selection seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    xs = range(len(rows))
    held = [r["paired"]["mean"] for r in rows]
    lo = [r["paired"]["mean"] - r["paired"]["ci95"][0] for r in rows]
    hi = [r["paired"]["ci95"][1] - r["paired"]["mean"] for r in rows]
    ax.errorbar(xs, held, yerr=[lo, hi], fmt="o", capsize=4, color="k",
                label="held-out seeds: mean paired Δ, 95% CI")
    ax.plot(xs, [r["selection_delta_pt"] for r in rows], "x", color="tab:red", markersize=9,
            label="selection seeds (winner's curse)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), [f"{r['budget']}\nvs {r['best_fixed']}" for r in rows], fontsize=8)
    ax.set_ylabel("plan − best fixed (accuracy pt)")
    ax.set_title("Planner vs best fixed config, Lite0 on digits (budgets where they differ)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evidence", default="benchmarks/results/plan_evidence_cpu.json")
    p.add_argument("--plans", default="runs/plan_evidence", help="its plan_<budget>.json files")
    p.add_argument("--runs", default="runs/plan_holdout")
    p.add_argument("--seeds", default="5,6,7,8,9,10,11,12,13,14")
    p.add_argument("--out", default=None, help="JSON; the PNG goes beside it")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out")
    args = p.parse_args()
    if args.plot_only:
        rows = json.loads(Path(args.out).read_text())["rows"]
        print(f"wrote {plot(rows, Path(args.out).with_suffix('.png'))}")
        return
    ev = json.loads(Path(args.evidence).read_text())
    proto, seeds = ev["protocol"], [int(s) for s in args.seeds.split(",")]
    if set(seeds) & set(ev["seeds"]):
        raise SystemExit(f"--seeds must not overlap the evidence seeds {ev['seeds']}")
    rows = [r for r in ev["rows"] if r["plan_same_as_fixed"] != r["best_fixed"]]
    jobs = [(r, s) for r in rows for s in seeds]
    res: dict[str, dict[str, list[float]]] = {r["budget"]: {"plan": [], "fixed": []} for r in rows}
    plans = {r["budget"]: load_plan(Path(args.plans) / f"plan_{r['budget']}.json") for r in rows}
    fixed = {r["budget"]: tuple(int(v) for v in r["best_fixed"].removeprefix("last ").split(" r="))
             for r in rows}  # "last N r=R" -> (N, R)
    for r, seed in tqdm(jobs, desc="held-out runs", unit="pair"):
        plan, (n, rad) = plans[r["budget"]], fixed[r["budget"]]
        base = Path(args.runs) / f"seed{seed}"
        res[r["budget"]]["plan"].append(
            _run(proto, base / f"plan_{r['budget']}", seed, dict(plan.layers), plan.train_last))
        res[r["budget"]]["fixed"].append(
            _run(proto, base / f"last{n}_r{rad}", seed, rad, n))
    out_rows = []
    for r in rows:
        a, b = res[r["budget"]]["plan"], res[r["budget"]]["fixed"]
        row = {"budget": r["budget"], "plan_train_last": r["plan_train_last"],
               "best_fixed": r["best_fixed"],
               "selection_delta_pt": r["delta_vs_best_pt"],
               "plan_acc": a, "fixed_acc": b,
               "plan_mean": statistics.mean(a), "fixed_mean": statistics.mean(b),
               "paired": paired(a, b)}
        out_rows.append(row)
        pr = row["paired"]
        print(f"{r['budget']:>5s}: plan {row['plan_mean']:.2f} vs {r['best_fixed']} "
              f"{row['fixed_mean']:.2f}  Δ {pr['mean']:+.2f} pt, 95% CI "
              f"[{pr['ci95'][0]:+.2f}, {pr['ci95'][1]:+.2f}] -> {pr['verdict']}  "
              f"(on the selection seeds: {r['delta_vs_best_pt']:+.2f})", flush=True)
    if args.out:
        write_json_atomic({"protocol": proto, "selection_seeds": ev["seeds"],
                           "heldout_seeds": seeds, "rows": out_rows,
                           "load_average": os.getloadavg(), "machine": machine_info("cpu")},
                          Path(args.out))
        print(f"wrote {args.out} and {plot(out_rows, Path(args.out).with_suffix('.png'))}")


if __name__ == "__main__":
    main()
