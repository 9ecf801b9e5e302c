"""``gradfilter compare``: put several ``gradfilter finetune`` runs side by side - a table of
accuracy (mIoU for segmentation runs), step time and activation memory, and a plot of accuracy
against each."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from .methods import default_lean

__all__ = ["compare_runs", "format_table", "load_runs", "metric_key", "plot_labels", "plot_rounds",
           "plot_runs", "to_mib"]

COLUMNS = ("run", "method", "radius", "train_last", "val_accuracy", "step_time_ms", "saved MiB")
METRICS = {"val_accuracy": "val accuracy", "val_miou": "val mIoU"}  # metrics.json key: label


def metric_key(rows: list[dict[str, Any]]) -> str:
    """The quality metric the runs share: ``val_miou`` (segmentation) or ``val_accuracy``."""
    keys = {next((k for k in ("val_miou", "val_accuracy") if k in row), None) for row in rows}
    if len(keys) != 1:
        raise ValueError("cannot compare segmentation runs (val_miou) with classification runs "
                         "(val_accuracy)")
    return keys.pop()


def load_runs(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Each folder's ``metrics.json`` (a ``finetune`` run's dict), with ``run`` set to the
    folder."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    rows = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"run folder {d} has no metrics.json (is it a finished "
                                    f"'gradfilter finetune' --out folder?)")
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not readable JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path} does not hold one run's metrics (a JSON object)")
        missing = [k for k in ("method", "step_time_ms", "saved_activation_bytes")
                   if k not in row]
        if not any(k in row for k in METRICS):
            missing.append("val_accuracy (or val_miou)")
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}")
        rows.append({**row, "run": str(d)})
    metric_key(rows)
    return rows


def to_mib(n: Any) -> float:
    """Bytes as MiB; NaN for a missing value."""
    return n / 2**20 if isinstance(n, (int, float)) else math.nan


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def _radius(value: Any) -> str | None:
    """A run's radius as one short label: a planned run's per-conv radii ({conv: r}) become
    "plan r" where they agree and "plan lo-hi" where they do not; None stays None."""
    if isinstance(value, dict):
        radii = sorted({int(r) for r in value.values()})
        if not radii:
            return "plan"
        return f"plan {radii[0]}" if len(radii) == 1 else f"plan {radii[0]}-{radii[-1]}"
    return None if value is None else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    key = metric_key(rows)
    body = [
        (
            row["run"],
            str(row["method"]),
            _fmt(_radius(row.get("radius"))),
            _fmt(row.get("train_last")),
            "-" if row[key] is None else f"{100 * row[key]:.2f}%",
            _fmt(row["step_time_ms"], ".1f"),
            _fmt(to_mib(row["saved_activation_bytes"]), ".2f"),
        )
        for row in rows
    ]
    columns = tuple(key if c == "val_accuracy" else c for c in COLUMNS)
    widths = [max(len(x) for x in col) for col in zip(columns, *body)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))).rstrip() for r in [columns, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _label(row: dict[str, Any]) -> str:
    radius = _radius(row.get("radius"))
    name = row["method"] if radius is None else f"{row['method']} r={radius}"
    if row.get("input_grad") == "exact":
        name += " exact gx"
    if row.get("lean") and row.get("lean") != default_lean(row["method"]):
        name += f" lean {row['lean']}"
    if row.get("fused_blocks") and row["method"] != "fused":  # runs of version 0.1
        name += " fused"
    return f"{name} last {row['train_last']}" if row.get("train_last") is not None else name


def plot_labels(rows: list[dict[str, Any]]) -> list[str]:
    """Each run's label in the plot; runs whose settings read the same get their folder's name
    (or their place in ``rows``) in front (runs that differ only in epochs, seed or data)."""
    labels = [_label(row) for row in rows]
    out = []
    for i, (row, label) in enumerate(zip(rows, labels)):
        if labels.count(label) > 1:
            label = f"{Path(row['run']).name if row.get('run') else f'#{i + 1}'}: {label}"
        out.append(label)
    return out


def plot_runs(rows: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Accuracy (or mIoU) vs median step time and vs saved activation MiB, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = metric_key(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = plot_labels(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    try:
        for row, label in zip(rows, labels):
            acc = 100 * row[key] if row[key] is not None else math.nan
            xs = (row["step_time_ms"], to_mib(row["saved_activation_bytes"]))
            for ax, x in zip(axes, xs):
                ax.scatter([x], [acc], s=60, label=label)
                ax.annotate(label, (x, acc), textcoords="offset points", xytext=(6, 4),
                            fontsize=8)
        axes[0].set_xlabel("median training step (ms)")
        axes[1].set_xlabel("activations saved for backward per step (MiB)")
        axes[0].set_ylabel(f"{METRICS[key]} (%)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.margins(x=0.2, y=0.15)
        axes[0].legend(fontsize=8)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_rounds(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Federated runs (``rounds_log`` in their metrics): global accuracy per round and the
    bytes the clients sent, cumulated over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for row, label in zip(rows, plot_labels(rows)):
            log = row.get("rounds_log") or []
            rounds = [0] + [r["round"] for r in log]
            acc = [row.get("initial_val_accuracy")] + [r["val_accuracy"] for r in log]
            sent, total = [0.0], 0
            for r in log:
                total += r["bytes_sent_by_clients"]
                sent.append(to_mib(total))
            axes[0].plot(rounds, [math.nan if a is None else 100 * a for a in acc],
                         marker="o", label=label)
            axes[1].plot(rounds, sent, marker="o", label=label)
        axes[0].set_ylabel("global val accuracy (%)")
        axes[1].set_ylabel("MiB sent by clients (cumulative)")
        for ax in axes:
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> int:
    """Print the table; write the plot to ``out`` (default ``compare.png`` in the current
    folder); return an exit code."""
    rows = load_runs(run_dirs)
    print(format_table(rows))
    try:
        plot_path = plot_runs(rows, out if out is not None else "compare.png")
    except ImportError:
        print("\nno plot: matplotlib is not installed", file=sys.stderr)
        return 0
    print(f"\nwrote {plot_path}")
    federated = [row for row in rows if row.get("rounds_log")]
    if federated:
        rounds_path = plot_path.with_name(plot_path.stem + "_rounds.png")
        print(f"wrote {plot_rounds(federated, rounds_path)}")
    return 0
