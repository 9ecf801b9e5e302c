"""The Flower ``ClientApp``: fine-tunes the filtered model on this node's share of the data with
:func:`gradfilter.train.train` and replies with the trainable parameters only.

Deployment loads ``gradfilter.federated.client_app:app``; the simulation builds its own with
:func:`make_client_app` so that the run's settings reach it without a ``pyproject.toml``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..train.trainer import cross_entropy, train
from .config import resolve_config
from .task import build_model, client_dataset, load_trainable, trainable_state

__all__ = ["app", "make_client_app"]

# Settings that change the model a client builds; a process keeps one model per such key.
_MODEL_KEYS = ("model", "pretrained", "data", "image-size", "seed", "method", "radius",
               "train-last", "batch-size")
_MODELS: dict[tuple, nn.Module] = {}


def _model(cfg: Mapping[str, Any]) -> nn.Module:
    key = tuple(cfg[k] for k in _MODEL_KEYS)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_model(cfg)[0]
    return _MODELS[key]


def _proximal_loss(model: nn.Module, mu: float) -> Any:
    """Cross-entropy plus FedProx's ``mu/2 * ||w - w_global||^2`` over the trainable weights
    (``w_global`` is what the server sent this round)."""
    if mu == 0:
        return cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        return cross_entropy(outputs, targets) + 0.5 * mu * prox

    return loss


def _inject_fault(cfg: Mapping[str, Any], partition_id: int, server_round: int) -> None:
    action, at_round = cfg["faults"].get(partition_id, ("", -1))
    if at_round != server_round:
        return
    if action == "kill":  # the process running this ClientApp dies mid-round
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault: client {partition_id} fails in round {server_round}")


def _train(defaults: Mapping[str, Any], msg: Message, context: Context) -> Message:
    cfg = resolve_config({**defaults, **context.run_config})
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    config = msg.content["config"]
    server_round = int(config["server-round"])
    torch.set_num_threads(cfg["client-threads"])
    _inject_fault(cfg, partition_id, server_round)

    model = _model(cfg)
    load_trainable(model, msg.content["arrays"].to_torch_state_dict())
    data = client_dataset(cfg, partition_id, num_partitions)
    order = torch.Generator().manual_seed(
        cfg["seed"] * 1_000_003 + partition_id * 1_009 + server_round)
    loader = DataLoader(data, batch_size=cfg["batch-size"], shuffle=True, generator=order,
                        drop_last=len(data) > cfg["batch-size"])
    mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0
    metrics = train(model, loader, None, epochs=cfg["local-epochs"], lr=cfg["lr"],
                    optimizer=cfg["optimizer"], loss_fn=_proximal_loss(model, mu),
                    progress=False)
    arrays = ArrayRecord(trainable_state(model))
    reply = MetricRecord({
        "num-examples": len(data),
        "partition-id": partition_id,
        "train-loss": float(metrics["train_loss"][-1]),
        "step-time-ms": float(metrics["step_time_ms"]),
        "train-time-s": float(metrics["train_time_s"]),
        "steps": int(metrics["steps"]),
        "saved-activation-bytes": int(metrics["saved_activation_bytes"] or 0),
        "bytes-sent": int(arrays.count_bytes()),
        "full-model-bytes": int(ArrayRecord(model.state_dict()).count_bytes()),
    })
    return Message(RecordDict({"arrays": arrays, "metrics": reply}), reply_to=msg)


def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ``ClientApp`` whose settings are ``defaults`` overridden by the run config."""
    defaults = dict(defaults or {})
    client = ClientApp()

    @client.train()
    def _(msg: Message, context: Context) -> Message:
        return _train(defaults, msg, context)

    return client


app = make_client_app()
