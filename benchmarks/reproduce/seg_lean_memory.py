"""Saved activation bytes inside the trained blocks of the segmentation models, r=4: vanilla vs
filtered convs vs lean blocks (``--method lean``, BatchNorm mode ``--lean patch`` / ``frozen``).

One forward of a 4 x 3 x 64 x 64 batch (the table's settings), bytes attributed to the trained
blocks by ``count_saved(model=...)``; random init (bytes do not depend on the weights).

    .venv/bin/python benchmarks/reproduce/seg_lean_memory.py
    # -> benchmarks/results/seg_lean_memory.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gradfilter import count_saved
from gradfilter.models import create_model
from gradfilter.train import prepare_model

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [("vanilla", 0, None), ("filtered", 4, None), ("lean", 4, "patch"),
           ("lean", 4, "frozen")]


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    rows = []
    for name in ("deeplabv3_tf_efficientnet_lite0", "upernet_tf_efficientnet_lite0"):
        for last in (5, 10):
            row = {"model": name, "train_last": last}
            for method, radius, lean in CONFIGS:
                model, info = prepare_model(create_model(name, 5), method, radius, last, x[:2],
                                            lean=lean)
                model.train()
                with count_saved(model.parameters(), model=model) as saved:
                    model(x)
                key = method if lean is None else f"{method}_{lean}"
                row[f"bytes_{key}"] = saved.bytes_under(info.blocks)
            base = row["bytes_vanilla"]
            ratios = {k[6:]: base / v for k, v in row.items() if k.startswith("bytes_")}
            row["ratio_vs_vanilla"] = ratios
            rows.append(row)
            print(f"{name} last {last}: " + ", ".join(f"{k} {v:.2f}x less"
                                                     for k, v in ratios.items()))
    out = ROOT / "benchmarks" / "results" / "seg_lean_memory.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
