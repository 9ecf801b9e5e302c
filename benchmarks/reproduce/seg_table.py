"""Segmentation results table: vanilla vs filtered (and lean) fine-tuning on synthetic-seg.

Every run is one ``gradfilter finetune`` (called in-process, same code path as the CLI) into
``--runs/<model>/last<N>/<method>/seed<S>``; a run whose ``metrics.json`` exists is reused, so
a killed table resumes.

Two protocols. ``scratch``: the decoder starts from random weights (only the encoder is
ImageNet-pretrained). ``source`` (the paper's: a segmentation model trained on one set,
fine-tuned on another): each model is first trained with vanilla backprop, all its blocks, on
``synthetic-seg-source`` (other shape classes, swapped photo pools); that run is cached under
``--source-cache`` and reused; every table run then starts from its weights with the
classifier re-initialised (``reinit_head``: the class set differs).

Then the runs are aggregated per (model, N, method): mIoU mean ± std
over seeds, pixel accuracy, median step time, and activation bytes saved for backward (measured
with ``saved_tensors_hooks`` over the whole trainable part, and the filtered convs' inputs alone
from the conversion report). Writes JSON, a markdown table and one PNG per model.

    python benchmarks/reproduce/seg_table.py --json benchmarks/results/seg_table_cpu.json \\
        --md benchmarks/results/seg_table_cpu.md
    python benchmarks/reproduce/seg_table.py --protocol source --workers 1  # -> *_source_cpu.*
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gradfilter.compare import plot_runs
from gradfilter.files import save_atomic, write_json_atomic
from gradfilter.machine import machine_info
from gradfilter.models import block_names, create_model
from gradfilter.train.runner import finetune

MODELS = ("deeplabv3_tf_efficientnet_lite0", "upernet_tf_efficientnet_lite0")


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _methods(radii: list[int], lean_radii: list[int] = (), lean: str = "patch",
             exact_radii: list[int] = (), exact_lean_radii: list[int] = ()
             ) -> list[tuple[str, int | None, str | None, str]]:
    """(method, radius, lean, input_grad) of every run of one config: vanilla, filtered at each
    radius, lean (BatchNorm mode ``lean``) at each of ``lean_radii``, then the same two with
    exact input gradients at ``exact_radii`` / ``exact_lean_radii``."""
    return [("vanilla", None, None, "filtered"),
            *(("filtered", r, None, "filtered") for r in radii),
            *(("lean", r, lean, "filtered") for r in lean_radii),
            *(("filtered", r, None, "exact") for r in exact_radii),
            *(("lean", r, lean, "exact") for r in exact_lean_radii)]


def _method(m: dict[str, Any]) -> str:
    """A run's method; runs saved under the old name "gradfilter" are filtered or lean."""
    if m["method"] != "gradfilter":
        return m["method"]
    return "lean" if m.get("lean") else "filtered"


def _tag(radius: int | None, lean: str | None, input_grad: str = "filtered") -> str:
    if radius is None:
        return "vanilla"
    return (f"r{radius}" + ("-exactgx" if input_grad == "exact" else "")
            + (f"-lean{lean}" if lean else ""))


def source_checkpoint(model: str, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Weights of ``model`` trained (vanilla, all blocks, ImageNet encoder to start) on
    ``synthetic-seg-source``; built once into ``--source-cache`` and reused. Returns the
    weights file (a plain state_dict, written atomically) and the source run's metrics."""
    folder = (Path(args.source_cache) / model
              / f"s{args.image_size}_e{args.source_epochs}_lr{args.source_lr:g}")
    weights = folder / "weights.pt"
    if not weights.is_file():
        if (folder / "checkpoint.pt").exists():  # killed mid-run: start it again
            (folder / "checkpoint.pt").unlink()
        n_blocks = len(block_names(create_model(model, 6)))
        t = time.perf_counter()
        finetune(model=model, data="synthetic-seg-source", out=folder, epochs=args.source_epochs,
                 batch_size=args.batch_size, lr=args.source_lr, method="vanilla", radius=None,
                 train_last=n_blocks, pretrained=True, image_size=args.image_size, seed=0,
                 optimizer="adamw", quiet=True, device=args.device)
        ckpt = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
        save_atomic(ckpt["model"], weights)
        print(f"source model {model}: {time.perf_counter() - t:.0f} s -> {weights}", flush=True)
    return weights, json.loads((folder / "metrics.json").read_text())


def run_all(args: argparse.Namespace, shard: int | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) every run of the plan; with ``shard``, only every ``workers``-th one.

    Seed-major order, so that the vanilla and filtered runs of one config run close together
    in time (the machine's load drifts) and shards get a mix of configs.
    """
    runs = []
    methods = _methods(_ints(args.radii), _ints(args.lean_radii), args.lean,
                       _ints(args.exact_radii), _ints(args.exact_lean_radii))
    plan = [(m, n, meth, r, lean, ig, s) for s in _ints(args.seeds)
            for m in args.models.split(",") for n in _ints(args.train_last)
            for meth, r, lean, ig in methods]
    for i, (model, n, method, radius, lean, input_grad, seed) in enumerate(plan, 1):
        tag = _tag(radius, lean, input_grad)
        out = Path(args.runs) / model / f"last{n}" / tag / f"seed{seed}"
        if shard is not None:
            if (i - 1) % args.workers != shard:
                continue
        elif not (out / "metrics.json").is_file():
            if not args.partial:
                raise RuntimeError(f"{out} has no metrics.json after all workers finished")
            continue  # --partial: aggregate the runs that exist
        if not (out / "metrics.json").is_file():
            if (out / "checkpoint.pt").exists():  # killed mid-run: start that run again
                (out / "checkpoint.pt").unlink()
            t = time.perf_counter()
            init = source_checkpoint(model, args)[0] if args.protocol == "source" else None
            finetune(model=model, data="synthetic-seg", out=out, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, method=method, radius=radius,
                     train_last=n, pretrained=True, image_size=args.image_size, seed=seed,
                     optimizer="adamw", quiet=True, device=args.device, lean=lean,
                     checkpoint=init, reinit_head=init is not None, input_grad=input_grad)
            print(f"[{i}/{len(plan)}] {model} last {n} {tag} seed {seed}: "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        m = json.loads((out / "metrics.json").read_text())
        wanted = {"lr": args.lr, "epochs": args.epochs, "image_size": args.image_size,
                  "batch_size": args.batch_size}
        if any(m.get(k) != v for k, v in wanted.items()):  # never mix settings in one table
            raise RuntimeError(f"{out} was run with other settings "
                               f"({ {k: m.get(k) for k in wanted} }); use another --runs")
        runs.append({**m, "method": _method(m), "run": str(out)})
    return runs


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        key = (r["model"], r["train_last"], r["method"], r["radius"], r.get("lean"),
               r.get("input_grad") or "filtered")
        groups.setdefault(key, []).append(r)
    rows = []
    for (model, n, method, radius, lean, input_grad), rs in groups.items():
        miou = [100 * r["val_miou"] for r in rs]
        conv = rs[0].get("filtered_conv_saved_bytes")
        rows.append({
            "model": model, "train_last": n, "method": method, "radius": radius, "lean": lean,
            "input_grad": input_grad, "seeds": [r["seed"] for r in rs],
            "miou_mean": statistics.mean(miou),
            "miou_std": statistics.stdev(miou) if len(miou) > 1 else 0.0,
            "miou": miou,
            "pixel_accuracy_mean": 100 * statistics.mean(r["val_pixel_accuracy"] for r in rs),
            "step_time_ms": statistics.median(r["step_time_ms"] for r in rs),
            "saved_activation_bytes": rs[0]["saved_activation_bytes"],
            "conv_input_bytes": conv,
            "blocks": rs[0]["blocks"],
            "filtered_layers": rs[0]["filtered_layers"],
        })
    for row in rows:  # deltas against vanilla on the same model and blocks
        base = next(b for b in rows if b["model"] == row["model"] and b["method"] == "vanilla"
                    and b["train_last"] == row["train_last"])
        row["miou_delta"] = row["miou_mean"] - base["miou_mean"]
        row["saved_ratio"] = base["saved_activation_bytes"] / row["saved_activation_bytes"]
        row["speedup"] = base["step_time_ms"] / row["step_time_ms"]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| model | last N | method | seeds | mIoU % (mean ± std) | Δ mIoU | pixel acc % "
            "| step ms | speed-up | saved MiB | saved ratio | filtered-conv inputs MiB "
            "(vanilla → filtered) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        conv = r["conv_input_bytes"]
        conv_s = "-" if not conv else (
            f"{conv['vanilla'] / 2**20:.2f} → {conv['filtered'] / 2**20:.2f} "
            f"({conv['vanilla'] / max(conv['filtered'], 1):.1f}×)")
        method = "vanilla" if r["radius"] is None else f"{r['method']} r={r['radius']}" + (
            f" ({r['lean']})" if r.get("lean") else "") + (
            ", exact gx" if r.get("input_grad") == "exact" else "")
        delta = "" if r["radius"] is None else f"{r['miou_delta']:+.1f}"
        lines.append(
            f"| {r['model']} | {r['train_last']} | {method} | {len(r['seeds'])} | "
            f"{r['miou_mean']:.1f} ± "
            f"{r['miou_std']:.1f} | {delta} | {r['pixel_accuracy_mean']:.1f} | "
            f"{r['step_time_ms']:.0f} | {r['speedup']:.2f}× | "
            f"{r['saved_activation_bytes'] / 2**20:.2f} | {r['saved_ratio']:.2f}× | {conv_s} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--train-last", default="5,10")
    p.add_argument("--radii", default="2,4")
    p.add_argument("--lean-radii", default="",
                   help="also run --method lean (BatchNorm mode: --lean) at these radii, "
                        "e.g. 4")
    p.add_argument("--lean", choices=["exact", "patch", "frozen"], default="patch")
    p.add_argument("--exact-radii", default="",
                   help="also run filtered convs with exact input gradients (--input-grad "
                        "exact) at these radii")
    p.add_argument("--exact-lean-radii", default="",
                   help="... and the same with --method lean at these radii")
    p.add_argument("--protocol", choices=["scratch", "source"], default="scratch",
                   help="scratch: decoder from random init; source: start from a model "
                        "trained on synthetic-seg-source (classifier re-initialised)")
    p.add_argument("--source-epochs", type=int, default=8)
    p.add_argument("--source-lr", type=float, default=5e-4)
    p.add_argument("--source-cache", default="runs/seg_source",
                   help="where the source-trained models are built once and reused")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared, oversubscribed CPU two threads "
                        "spin-wait on each other and run several times slower)")
    p.add_argument("--runs", default=None,
                   help="folder of the run folders (runs/seg_table[_source])")
    p.add_argument("--workers", type=int, default=2,
                   help="run the plan in this many processes (each --threads threads)")
    p.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--partial", action="store_true",
                   help="only aggregate the finished runs (no training); for a cut-short table")
    p.add_argument("--json", default=None,
                   help="default benchmarks/results/seg_table[_source]_cpu.json")
    p.add_argument("--md", default=None, help="default: the --json path with .md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    suffix = "" if args.protocol == "scratch" else "_source"
    args.runs = args.runs or f"runs/seg_table{suffix}"
    args.json = args.json or f"benchmarks/results/seg_table{suffix}_cpu.json"
    args.md = args.md or str(Path(args.json).with_suffix(".md"))

    if args.shard is not None:  # a worker: run its share, the parent aggregates
        run_all(args, shard=args.shard)
        return
    t0, load0 = time.perf_counter(), os.getloadavg()
    sources = {}
    if args.protocol == "source":  # built here once, before the workers read them
        for model in args.models.split(","):
            if args.partial and not (Path(args.source_cache) / model).exists():
                continue
            path, m = source_checkpoint(model, args)
            sources[model] = {"weights": str(path), "val_miou": m["val_miou"],
                              "val_pixel_accuracy": m["val_pixel_accuracy"],
                              "train_time_s": m["train_time_s"], "blocks": len(m["blocks"])}
    cmd = [sys.executable, __file__, *sys.argv[1:]]
    workers = [] if args.partial else [subprocess.Popen([*cmd, "--shard", str(i)])
                                       for i in range(args.workers)]
    codes = [w.wait() for w in workers]
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes}); rerun to resume")
    runs = run_all(args)
    rows = aggregate(runs)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("json", "md", "runs", "shard")}
    result = {
        "settings": {**settings, "data": "synthetic-seg", "optimizer": "adamw",
                     "pretrained": True},
        "source_models": sources,
        "machine": machine_info(args.device),
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
        "runs": [{k: r.get(k) for k in ("run", "model", "train_last", "method", "radius",
                                        "lean", "input_grad", "seed",
                                    "val_miou", "val_pixel_accuracy", "step_time_ms",
                                    "saved_activation_bytes", "train_time_s")} for r in runs],
    }
    write_json_atomic(result, Path(args.json))
    table = markdown(rows)
    Path(args.md).write_text(table, encoding="utf-8")
    for model in {r["model"] for r in rows}:
        pts = [{**r, "val_miou": r["miou_mean"] / 100} for r in rows if r["model"] == model]
        stem = Path(args.json).stem.removesuffix("_cpu")  # seg_table[_source]...
        plot_runs(pts, Path(args.json).with_name(f"{stem}_{model}.png"),
                  title=f"{model} on synthetic-seg, {args.protocol} "
                        f"(mean of {len(_ints(args.seeds))} seeds)")
    print(table)
    print(f"wrote {args.json}, {args.md} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
