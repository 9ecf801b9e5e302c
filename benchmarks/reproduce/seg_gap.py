"""Where the segmentation accuracy gap comes from, under the source protocol of seg_table.py.

Two parts, seed 0, on the models ``seg_table.py --protocol source`` trains (its source
checkpoints and vanilla runs are reused, so run that first):

* fidelity: per filtered conv of the last N blocks, the cosine of the filtered vs exact weight
  gradient and the share of output-gradient energy the r x r patch means keep
  (``gradfilter.diagnostics.inspect`` with the pixel-wise loss), at the weights of the vanilla
  run fine-tuned on synthetic-seg, on its first training batches;
* ablations (each one ``finetune`` run, resumable like seg_table.py): the classifier left
  exact (every other conv of the last N filtered), larger inputs (the source models stay the
  64-px ones), longer training, a lower learning rate.

    python benchmarks/reproduce/seg_gap.py     # -> benchmarks/results/seg_gap_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from seg_table import source_checkpoint  # same folder: the cached source models
from torch.utils.data import DataLoader

from gradfilter.data import get_dataset
from gradfilter.diagnostics import inspect, select_convs
from gradfilter.files import write_json_atomic
from gradfilter.models import block_names, create_model, load_checkpoint
from gradfilter.train.metrics import segmentation_loss
from gradfilter.train.runner import finetune

MODELS = ("deeplabv3_tf_efficientnet_lite0", "upernet_tf_efficientnet_lite0")


def _convs_of_last(model: torch.nn.Module, n: int) -> list[str]:
    return list(select_convs(model, block_names(model)[-n:]))


def fidelity(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-conv gradient fidelity at the vanilla fine-tuned weights (seed 0)."""
    splits = get_dataset("synthetic-seg", image_size=args.image_size, split="train")
    loader = DataLoader(splits.train, batch_size=16, shuffle=False)
    rows = []
    for model in args.models.split(","):
        run = Path(args.table_runs) / model / f"last{args.train_last}" / "vanilla" / "seed0"
        if not (run / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"{run}/checkpoint.pt: run seg_table.py --protocol source "
                                    "first")
        net = create_model(model, splits.num_classes)
        load_checkpoint(net, run / "checkpoint.pt", keep_fresh_head=False)
        report = inspect(net, loader, layers=_convs_of_last(net, args.train_last), radii=(2, 4),
                         loss_fn=segmentation_loss(splits.ignore_index), max_batches=2)
        for row in report.rows:
            rows.append({"model": model, "layer": row.layer, "radius": row.radius,
                         "kind": row.kind, "out_hw": list(row.out_shape[-2:]),
                         "cos_weight": row.cos_weight, "cos_input": row.cos_input,
                         "energy_kept": row.energy_kept})
    return rows


def ablations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(name, model, overrides) runs, each from the model's source checkpoint."""
    n = args.train_last
    plan: list[tuple[str, str, dict[str, Any]]] = []
    for model in args.models.split(","):
        convs = _convs_of_last(create_model(model, 5), n)
        for r in (2, 4):
            plan.append((f"r{r}-exact-classifier", model, {
                "method": "filtered",
                "radius": {c: r for c in convs if c != "decoder.classifier"}}))
    upernet = MODELS[1]
    for size in _ints(args.sizes):
        for tag, method, r in (("vanilla", "vanilla", None), ("r2", "filtered", 2),
                               ("r4", "filtered", 4)):
            plan.append((f"{tag}-{size}px", upernet, {"method": method, "radius": r,
                                                      "image_size": size}))
    for tag, method, r in (("vanilla", "vanilla", None), ("r4", "filtered", 4)):
        plan.append((f"{tag}-{args.long_epochs}ep", upernet,
                     {"method": method, "radius": r, "epochs": args.long_epochs}))
    for lr in _floats(args.lrs):
        for model in args.models.split(","):
            for tag, method, r in (("vanilla", "vanilla", None), ("r2", "filtered", 2),
                                   ("r4", "filtered", 4)):
                plan.append((f"{tag}-lr{lr:g}", model, {"method": method, "radius": r,
                                                        "lr": lr}))
    out_rows = []
    for i, (name, model, over) in enumerate(plan, 1):
        out = Path(args.runs) / model / f"last{n}" / name
        if not (out / "metrics.json").is_file():
            if (out / "checkpoint.pt").exists():
                (out / "checkpoint.pt").unlink()
            init, _ = source_checkpoint(model, args)
            kw = {"epochs": args.epochs, "image_size": args.image_size, "lr": args.lr, **over}
            t = time.perf_counter()
            finetune(model=model, data="synthetic-seg", out=out, batch_size=args.batch_size,
                     train_last=n, pretrained=True, seed=0, optimizer="adamw",
                     quiet=True, device="cpu", checkpoint=init, reinit_head=True, **kw)
            print(f"[{i}/{len(plan)}] {model} {name}: {time.perf_counter() - t:.0f} s",
                  flush=True)
        m = json.loads((out / "metrics.json").read_text())
        out_rows.append({"name": name, "model": model, "image_size": m["image_size"],
                         "epochs": m["epochs"], "lr": m["lr"],
                         # runs saved under the old name "gradfilter" are filtered runs
                         "method": "filtered" if m["method"] == "gradfilter" else m["method"],
                         "val_miou": m["val_miou"], "step_time_ms": m["step_time_ms"],
                         "saved_activation_bytes": m["saved_activation_bytes"],
                         "filtered_layers": len(m["filtered_layers"])})
    return out_rows


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def markdown(fid: list[dict[str, Any]], abl: list[dict[str, Any]]) -> str:
    lines = ["| model | radius | convs | cos weight (median, min) | cos input (median, min) "
             "| energy kept (median, min) | classifier: cos weight, energy kept |",
             "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in fid):
        for r in (2, 4):
            rows = [x for x in fid if x["model"] == model and x["radius"] == r]
            cw, ek = [x["cos_weight"] for x in rows], [x["energy_kept"] for x in rows]
            ci = [x["cos_input"] for x in rows]
            cls = next(x for x in rows if x["layer"] == "decoder.classifier")
            lines.append(f"| {model} | {r} | {len(rows)} | {statistics.median(cw):.2f}, "
                         f"{min(cw):.2f} | {statistics.median(ci):.2f}, {min(ci):.2f} | "
                         f"{statistics.median(ek):.2f}, {min(ek):.2f} | "
                         f"{cls['cos_weight']:.2f}, {cls['energy_kept']:.2f} |")
    lines += ["", "| model | run | image px | epochs | lr | mIoU % | step ms | saved MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for a in abl:
        lines.append(f"| {a['model']} | {a['name']} | {a['image_size']} | {a['epochs']} | "
                     f"{a['lr']:g} | {100 * a['val_miou']:.1f} | {a['step_time_ms']:.0f} | "
                     f"{a['saved_activation_bytes'] / 2**20:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--train-last", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--sizes", default="128", help="larger input sizes to try (UPerNet)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--long-epochs", type=int, default=6)
    p.add_argument("--lrs", default="5e-4,2e-4", help="other fine-tuning learning rates to try")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--source-epochs", type=int, default=8)
    p.add_argument("--source-lr", type=float, default=5e-4)
    p.add_argument("--source-cache", default="runs/seg_source")
    p.add_argument("--table-runs", default="runs/seg_table_source")
    p.add_argument("--runs", default="runs/seg_gap")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # source models: CPU
    p.add_argument("--json", default="benchmarks/results/seg_gap_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fid = fidelity(args)
    abl = ablations(args)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    write_json_atomic({"settings": settings, "fidelity": fid, "ablations": abl},
                      Path(args.json))
    table = markdown(fid, abl)
    Path(args.json).with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
