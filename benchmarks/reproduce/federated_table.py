"""Print docs/federated.md's results tables from federated_digits.sh's outputs.

Usage: python benchmarks/reproduce/federated_table.py [RESULTS_DIR]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

MIB = 2**20


def _load(folder: Path, kind: str, method: str) -> dict:
    """``<kind>_<method>.json``; results written under the old method name ``gradfilter``
    (``fed_gradfilter.json``) are read as the filtered runs."""
    path = folder / f"{kind}_{method}.json"
    if method == "filtered" and not path.exists():
        path = folder / f"{kind}_gradfilter.json"
    return json.loads(path.read_text(encoding="utf-8"))


def main(folder: Path) -> None:
    fed = {m: _load(folder, "fed", m) for m in ("vanilla", "filtered")}
    central = {m: _load(folder, "central", m) for m in ("vanilla", "filtered")}
    label = {"vanilla": "vanilla", "filtered": f"r={fed['filtered']['radius']}"}

    print("Global val accuracy (%) after each round (round 0: the pretrained start):\n")
    n = len(fed["vanilla"]["rounds_log"])
    print("| run | " + " | ".join(str(i) for i in range(n + 1)) + " |")
    print("|---" * (n + 2) + "|")
    for m, run in fed.items():
        accs = [run["initial_val_accuracy"]] + [r["val_accuracy"] for r in run["rounds_log"]]
        print(f"| federated {label[m]} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")
    for m, run in central.items():
        accs = [h["val_accuracy"] for h in run["history"]]
        print(f"| centralized {label[m]} (per epoch) | - | "
              + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")

    print("\nPer run:\n")
    print("| run | final acc | median step ms | sent per client per round | "
          "whole model | sent by all clients per round | failures | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for m, run in fed.items():
        per_round = statistics.median(r["bytes_sent_by_clients"] for r in run["rounds_log"])
        print(f"| federated {label[m]} | {100 * run['val_accuracy']:.2f}% | "
              f"{run['step_time_ms']:.0f} | {run['trainable_bytes'] / MIB:.2f} MiB | "
              f"{run['full_model_bytes'] / MIB:.2f} MiB | {per_round / MIB:.1f} MiB | "
              f"{run['total_failures']} | {run['wall_time_s'] / 60:.1f} min |")
    for m, run in central.items():
        print(f"| centralized {label[m]} | {100 * run['val_accuracy']:.2f}% | "
              f"{run['step_time_ms']:.0f} | - | - | - | - | {run['run_time_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/federated_digits"))
