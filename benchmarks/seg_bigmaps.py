"""Pilot: UPerNet fine-tuned with exact input gradients, filtering only the convs whose output
map holds at least ``--min-patches`` r×r patches (the others stay plain: on 2×2 … 8×8 maps
their weight-gradient fidelity is the lowest and their inputs are small).

Same source model, data, seeds and settings as the lr 5e-4 source table (docs/segmentation.md);
lean patch blocks. The vanilla rows to compare with come from ``benchmarks/seg_table.py
--protocol source --lr 5e-4``.

    python benchmarks/seg_bigmaps.py --out benchmarks/results/seg_bigmaps_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from seg_table import source_checkpoint  # same folder: the cached source models

from gradfilter import apply
from gradfilter.bench.machine import machine_info
from gradfilter.models import block_names, create_model
from gradfilter.train.checkpoint import write_json_atomic
from gradfilter.train.runner import finetune

MODEL = "upernet_tf_efficientnet_lite0"
# the source table's settings: its cached source model is reused (built here if missing)
SOURCE_ARGS = argparse.Namespace(source_cache="runs/seg_source", image_size=64, source_epochs=8,
                                 source_lr=5e-4, batch_size=4, device="cpu")


def big_map_convs(n: int, r: int, min_patches: int, size: int) -> tuple[dict[str, int], list]:
    """{conv: r} for the convs of the last ``n`` blocks with >= min_patches output patches."""
    net = create_model(MODEL, 5)
    blocks = block_names(net)[-n:]
    rep = apply(net, radius=r, names=[f"{b}.*" for b in blocks] + blocks,
                example_input=torch.zeros(4, 3, size, size))
    keep = {row.name: r for row in rep.layers
            if -(-row.out_shape[-1] // r) * -(-row.out_shape[-2] // r) >= min_patches}
    return keep, sorted(set(rep.names) - set(keep))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-patches", type=int, default=16)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--runs", default="runs/seg_bigmaps")
    p.add_argument("--out", default="benchmarks/results/seg_bigmaps_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    source = source_checkpoint(MODEL, SOURCE_ARGS)[0]
    rows = []
    for n in (5, 10):
        for r in (2, 4):
            keep, plain = big_map_convs(n, r, args.min_patches, 64)
            runs = []
            for seed in (int(s) for s in args.seeds.split(",")):
                out = Path(args.runs) / f"last{n}_r{r}" / f"seed{seed}"
                if (out / "metrics.json").exists():
                    runs.append(json.loads((out / "metrics.json").read_text()))
                    continue
                runs.append(finetune(
                    model=MODEL, data="synthetic-seg", out=out, epochs=2, batch_size=4,
                    lr=5e-4, method="gradfilter", radius=keep, train_last=n, pretrained=True,
                    image_size=64, seed=seed, optimizer="adamw", quiet=True, lean="patch",
                    checkpoint=source, reinit_head=True, input_grad="exact"))
            miou = [100 * m["val_miou"] for m in runs]
            rows.append({"train_last": n, "radius": r, "filtered": sorted(keep), "plain": plain,
                         "miou": miou, "miou_mean": statistics.mean(miou),
                         "miou_std": statistics.stdev(miou) if len(miou) > 1 else 0.0,
                         "saved_activation_bytes": runs[0]["saved_activation_bytes"],
                         "step_time_ms": statistics.median(m["step_time_ms"] for m in runs)})
            print(f"last {n} r={r}: {rows[-1]['miou_mean']:.1f} ± {rows[-1]['miou_std']:.1f} "
                  f"mIoU, {rows[-1]['saved_activation_bytes'] / 2**20:.2f} MiB saved; "
                  f"plain: {', '.join(plain)}", flush=True)
    write_json_atomic({"model": MODEL, "min_patches": args.min_patches, "lr": 5e-4,
                       "image_size": 64, "lean": "patch", "input_grad": "exact", "rows": rows,
                       "machine": machine_info("cpu")}, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
