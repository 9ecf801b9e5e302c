"""Epoch time with and without the frozen-prefix feature cache (``finetune --cache-features``).

Pretrained EfficientNet-Lite0 on digits at 128 px, filtered at r=2, batch 32, 2 epochs, last N
in {2, 8}; for each N the uncached and the cached run alternate in one process (uncached first, then
cached, then the pair again in the other order) and the medians are reported.

    .venv/bin/python benchmarks/reproduce/cache_speedup.py  # -> benchmarks/results/cache_cpu.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from gradfilter.machine import describe, machine_info
from gradfilter.train import runner

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    rows = []
    common = dict(model="tf_efficientnet_lite0", pretrained=True, data="digits", epochs=2,
                  batch_size=32, lr=5e-4, method="filtered", radius=2, image_size=128,
                  quiet=True)
    for n in (2, 8):
        epoch = {False: [], True: []}
        build = []
        acc = {}
        for order in ((False, True), (True, False)):
            for cached in order:
                runner._CACHE_MEMO.clear()  # time the cache build every time
                with tempfile.TemporaryDirectory() as tmp:
                    m = runner.finetune(out=Path(tmp) / "run", train_last=n,
                                        cache_features=cached, **common)
                epoch[cached].append(m["epoch_time_s"])
                acc[cached] = m["val_accuracy"]
                if cached:
                    build.append(m["cache_time_s"])
        row = {
            "train_last": n,
            "epoch_s_uncached": statistics.median(epoch[False]),
            "epoch_s_cached": statistics.median(epoch[True]),
            "cache_build_s": statistics.median(build),
            "val_accuracy_uncached": acc[False],
            "val_accuracy_cached": acc[True],
        }
        row["epoch_speedup"] = row["epoch_s_uncached"] / row["epoch_s_cached"]
        rows.append(row)
        print(f"last {n}: epoch {row['epoch_s_uncached']:.1f} s -> {row['epoch_s_cached']:.1f} s "
              f"with the cache ({row['epoch_speedup']:.2f}x; building it took "
              f"{row['cache_build_s']:.1f} s once); val acc {100 * acc[False]:.2f}% / "
              f"{100 * acc[True]:.2f}%", flush=True)
    info = machine_info("cpu")
    out = ROOT / "benchmarks" / "results" / "cache_cpu.json"
    out.write_text(json.dumps({"machine": info, "settings": common, "rows": rows}, indent=1))
    print(f"machine: {describe(info)}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
