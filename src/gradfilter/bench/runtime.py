"""``gradfilter bench executorch``: the training step inside the ExecuTorch runtime.

Per model and number of trained blocks: the exported training step (forward, loss, backward of
the trainable parameters, SGD update) of vanilla backprop and of the filtered methods, timed in
the runtime, beside the runtime's forward-only time of the same model. The *overhead* of a
method is its step time minus the forward-only time: what training adds to inference (the
frozen prefix's forward runs every step whatever the method). Also reported: the memory the
runtime plans for each program's non-constant tensors (``non_const_buffer_sizes``) and the
``.pte`` size. Rounds alternate the programs; times are medians over rounds. Models run in eval
mode (no dropout), so every program does the same work every step.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..machine import describe, machine_info
from . import save_result

__all__ = ["METHODS", "MODELS", "run_runtime_bench"]

MODELS = ("mobilenet_v2", "tf_efficientnet_lite0")
METHODS = ("vanilla", "filtered", "fused")
LAST = (4, 8)
NUM_CLASSES = 10


def _forward_only(net: torch.nn.Module, x: torch.Tensor) -> tuple[Any, bytes, dict[str, int]]:
    """The model's plain forward as a program in the runtime: (module, the program's bytes,
    which the module reads and the caller keeps alive, planned bytes)."""
    from executorch.exir import to_edge
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    from ..runtime.executorch import planned_bytes

    with torch.no_grad():
        ep = torch.export.export(net, (x,), strict=False)
    prog = to_edge(ep).to_executorch()
    buffer = prog.buffer
    return _load_for_executorch_from_buffer(buffer), buffer, planned_bytes(prog.executorch_program)


def _case(model_name: str, last: int, radius: int, batch: int, size: int, repeats: int,
          methods: tuple[str, ...]) -> dict[str, Any]:
    from ..models import create_model
    from ..runtime.executorch import export_training
    from ..train import prepare_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    programs: dict[str, Any] = {}
    row: dict[str, Any] = {"model": model_name, "last": last, "methods": {}}
    for method in methods:
        torch.manual_seed(0)
        net, _ = prepare_model(create_model(model_name, NUM_CLASSES), method, radius, last, x)
        t0 = time.perf_counter()
        prog = export_training(net.eval(), x, y, predict=False)
        trainer = prog.trainer()
        trainer.set_optimizer("sgd", lr=1e-4, momentum=0.9)
        programs[method] = trainer
        row["methods"][method] = {"export_s": time.perf_counter() - t0,
                                  "planned_bytes": prog.planned_bytes["forward"],
                                  "pte_bytes": prog.size_bytes, "step_ms": []}
    torch.manual_seed(0)
    plain = create_model(model_name, NUM_CLASSES).eval()
    fwd, buffer, planned = _forward_only(plain, x)
    row["forward_only"] = {"planned_bytes": planned["forward"], "pte_bytes": len(buffer),
                           "ms": []}
    # warm-up: the first run allocates and faults in the planned memory
    fwd.run_method("forward", (x,))
    for trainer in programs.values():
        trainer.step(x, y)
    for _ in range(repeats):  # rounds alternate the programs (a drifting machine moves all)
        t0 = time.perf_counter()
        fwd.run_method("forward", (x,))
        row["forward_only"]["ms"].append((time.perf_counter() - t0) * 1e3)
        for method, trainer in programs.items():
            t0 = time.perf_counter()
            trainer.step(x, y)
            row["methods"][method]["step_ms"].append((time.perf_counter() - t0) * 1e3)
    forward = statistics.median(row["forward_only"]["ms"])
    row["forward_only"]["median_ms"] = forward
    for m in row["methods"].values():
        m["median_ms"] = statistics.median(m["step_ms"])
        m["overhead_ms"] = m["median_ms"] - forward
    vanilla = row["methods"].get("vanilla")
    if vanilla is not None:
        for method, m in row["methods"].items():
            if method != "vanilla":
                m["overhead_reduction"] = vanilla["overhead_ms"] / max(m["overhead_ms"], 1e-9)
                m["speedup"] = vanilla["median_ms"] / m["median_ms"]
    return row


def _line(row: dict[str, Any]) -> str:
    parts = [f"{row['model']} last {row['last']}: forward {row['forward_only']['median_ms']:.0f}"
             " ms"]
    for method, m in row["methods"].items():
        extra = (f", overhead {m['overhead_reduction']:.1f}x smaller, {m['speedup']:.2f}x faster"
                 if "speedup" in m else "")
        parts.append(f"{method} step {m['median_ms']:.0f} ms (overhead {m['overhead_ms']:.0f} "
                     f"ms{extra}; planned {m['planned_bytes'] / 2**20:.1f} MiB)")
    return "; ".join(parts)


def run_runtime_bench(models=MODELS, lasts=LAST, radius: int = 4, batch: int = 8,
                      size: int = 128, repeats: int = 5, methods=METHODS,
                      out: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Benchmark every model and ``lasts`` setting in the ExecuTorch runtime; print a line per
    case; write JSON (+ PNG) to ``out``."""
    from ..runtime.executorch import require_executorch

    require_executorch()
    methods = tuple(methods)
    if repeats < 1 or batch < 1 or size < 1:
        raise ValueError(f"repeats, batch and size must be >= 1, got {repeats}, {batch}, {size}")
    cases = [(m, n) for m in models for n in lasts]
    from tqdm.auto import tqdm

    rows = []
    for model_name, last in tqdm(cases, desc="bench executorch", disable=quiet):
        row = _case(model_name, last, radius, batch, size, repeats, methods)
        rows.append(row)
        if not quiet:
            tqdm.write(_line(row))
    from importlib.metadata import version

    result = {"machine": machine_info("cpu"), "threads": torch.get_num_threads(),
              "executorch": version("executorch"), "kernels": "portable (no delegate)",
              "radius": radius, "batch": batch, "image_size": size, "repeats": repeats,
              "methods": list(methods), "rows": rows}
    if not quiet:
        print(f"machine: {describe(result['machine'])}; {result['threads']} threads")
    if out:
        save_result(result, out, plot)
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    """Step time per case and method, split into the forward-only part and the overhead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, methods = result["rows"], result["methods"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(rows), 4))
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(rows))]
        fwd = [r["forward_only"]["median_ms"] for r in rows]
        over = [r["methods"][method]["overhead_ms"] for r in rows]
        bars = ax.bar(xs, over, width, bottom=fwd, label=f"{method}: overhead")
        ax.bar(xs, fwd, width, color="lightgray", edgecolor=bars.patches[0].get_facecolor(),
               label="forward only" if j == 0 else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['model']}\nlast {r['last']}" for r in rows], fontsize=8)
    ax.set_ylabel("training step in ExecuTorch (ms)")
    ax.set_title(f"ExecuTorch {result['executorch']} runtime, batch {result['batch']}, "
                 f"{result['image_size']}², r={result['radius']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
