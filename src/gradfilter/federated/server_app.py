"""The Flower ``ServerApp``: builds the global model, runs FedAvg / FedProx through Flower's
``Strategy.start``, evaluates the global model on the held-out split after every round and
writes ``OUT/metrics.json``.

Deployment loads ``gradfilter.federated.server_app:app``; the simulation builds its own with
:func:`make_server_app`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..files import save_atomic, write_json_atomic
from ..train.trainer import evaluate
from .config import resolve_config
from .strategy import make_strategy
from .task import build_model, load_trainable, trainable_state, val_loader

__all__ = ["METRICS_NAME", "app", "make_server_app", "run_server"]

METRICS_NAME = "metrics.json"
MODEL_NAME = "global_model.pt"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _round_summary(rec: dict[str, Any], acc: float, t_end: float) -> dict[str, Any]:
    clients = rec.get("clients", [])
    failures = rec.get("failures", [])
    return {
        "round": rec["round"],
        "val_accuracy": acc,
        "wall_time_s": t_end - rec["t_start"],
        "clients_sampled": rec["sampled"],
        "clients_ok": len(clients),
        "clients_failed": len(failures),
        "failures": failures,
        "bytes_sent_by_clients": sum(int(c["bytes_sent"]) for c in clients),
        "bytes_sent_by_server": rec["sampled"] * rec["bytes_received_per_client"],
        "full_model_bytes_by_clients": sum(int(c["full_model_bytes"]) for c in clients),
        "client_step_time_ms": _median([float(c["step_time_ms"]) for c in clients]),
        "client_train_time_s": _median([float(c["train_time_s"]) for c in clients]),
        "clients": clients,
    }


def run_server(grid: Grid, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run the federated rounds of ``cfg`` over ``grid``; write and return the metrics."""
    from ..machine import machine_info

    t_run = time.perf_counter()
    model, info = build_model(cfg)
    loader = val_loader(cfg)
    strategy = make_strategy(dict(cfg))
    initial = ArrayRecord(trainable_state(model))
    full_bytes = ArrayRecord(model.state_dict()).count_bytes()
    accuracies: dict[int, float] = {}
    ends: dict[int, float] = {}
    bar = None
    if not cfg["quiet"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg["rounds"], desc="federated rounds", unit="round")

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_trainable(model, arrays.to_torch_state_dict())
        acc = evaluate(model, loader)
        accuracies[server_round] = acc
        ends[server_round] = time.perf_counter()
        if bar is not None and server_round > 0:
            bar.set_postfix(accuracy=f"{acc:.4f}", refresh=False)
            bar.update(1)
        return MetricRecord({"accuracy": acc})

    train_config = ConfigRecord({"local-epochs": cfg["local-epochs"]})
    try:
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg["rounds"],
                                timeout=cfg["round-timeout"], train_config=train_config,
                                evaluate_fn=evaluate_fn)
    finally:
        if bar is not None:
            bar.close()
    rounds = [_round_summary(rec, accuracies[rec["round"]], ends[rec["round"]])
              for rec in strategy.rounds]
    out = Path(cfg["out"])
    load_trainable(model, result.arrays.to_torch_state_dict())
    save_atomic(trainable_state(model), out / MODEL_NAME)
    steps = [r["client_step_time_ms"] for r in rounds if r["client_step_time_ms"] is not None]
    saved = [c["saved_activation_bytes"] for r in rounds for c in r["clients"]]
    metrics = {
        "kind": "federated",
        **{k.replace("-", "_"): v for k, v in cfg.items() if k not in ("faults", "quiet")},
        "radius": cfg["radius"] if cfg["method"] != "vanilla" else None,
        "flower_strategy": type(strategy).__mro__[2].__name__,
        "blocks": info.blocks,
        "filtered_layers": info.report.names if info.report is not None else [],
        "lean_layers": info.slimmed,
        "fused_blocks": info.fused,
        "trainable_params": info.trainable_params,
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_bytes": int(initial.count_bytes()),
        "full_model_bytes": int(full_bytes),
        "initial_val_accuracy": accuracies.get(0),
        "val_accuracy": rounds[-1]["val_accuracy"] if rounds else accuracies.get(0),
        "step_time_ms": _median(steps),
        "saved_activation_bytes": int(statistics.median(saved)) if saved else None,
        "total_failures": sum(r["clients_failed"] for r in rounds),
        "wall_time_s": time.perf_counter() - t_run,
        "rounds_log": rounds,
        "global_model": str(out / MODEL_NAME),
        "machine": machine_info("cpu"),
    }
    write_json_atomic(metrics, out / METRICS_NAME)
    return metrics


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ``ServerApp`` whose settings are ``defaults`` overridden by the run config."""
    defaults = dict(defaults or {})
    server = ServerApp()

    @server.main()
    def _(grid: Grid, context: Context) -> None:
        cfg = resolve_config({**defaults, **context.run_config})
        torch.manual_seed(cfg["seed"])
        run_server(grid, cfg)

    return server


app = make_server_app()
