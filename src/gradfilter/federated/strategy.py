"""Flower's own FedAvg / FedProx, with a record of every round: which clients replied, which
failed (raised, were killed, or timed out), what each sent, and how long the round took."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

__all__ = ["RecordingFedAvg", "RecordingFedProx", "make_strategy"]

CLIENT_KEYS = ("partition-id", "num-examples", "train-loss", "step-time-ms", "train-time-s",
               "steps", "saved-activation-bytes", "bytes-sent", "full-model-bytes")


def _short(reason: str, limit: int = 300) -> str:
    """The informative tail of an error reason (Ray wraps the client's message in a
    traceback)."""
    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else reason
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Recording:
    """Mixin over a Flower strategy: fills ``self.rounds`` (one dict per round)."""

    rounds: list[dict[str, Any]]

    def _init_record(self) -> None:
        self.rounds = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        t0 = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds.append({
            "round": server_round,
            "t_start": t0,
            "sampled": len(messages),
            "bytes_received_per_client": int(arrays.count_bytes()),
        })
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rec = self.rounds[-1]
        clients, failures = [], []
        for msg in replies:
            if msg.has_error():
                failures.append({"node_id": int(msg.metadata.src_node_id),
                                 "reason": _short(str(msg.error.reason))})
                continue
            m = msg.content["metrics"]
            clients.append({"node_id": int(msg.metadata.src_node_id),
                            **{k.replace("-", "_"): m[k] for k in CLIENT_KEYS if k in m}})
        missing = rec["sampled"] - len(replies)
        if missing > 0:
            failures += [{"node_id": None, "reason": "no reply before the round timeout"}
                         ] * missing
        rec["clients"] = sorted(clients, key=lambda c: c.get("partition_id", -1))
        rec["failures"] = failures
        return super().aggregate_train(server_round, replies)


class RecordingFedAvg(_Recording, FedAvg):
    """``flwr.serverapp.strategy.FedAvg`` that records each round."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_record()


class RecordingFedProx(_Recording, FedProx):
    """``flwr.serverapp.strategy.FedProx`` that records each round (clients read
    ``proximal-mu`` from the train config)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_record()


def make_strategy(cfg: dict[str, Any]) -> RecordingFedAvg:
    """FedAvg or FedProx for ``cfg``: all ``num-clients`` must be connected to start, a
    ``fraction-train`` of them train each round, no client-side evaluation (the server
    evaluates the global model on the held-out split)."""
    n = cfg["num-clients"]
    kwargs: dict[str, Any] = {
        "fraction_train": cfg["fraction-train"],
        "fraction_evaluate": 0.0,
        "min_train_nodes": max(1, int(n * cfg["fraction-train"])),
        "min_evaluate_nodes": 0,
        "min_available_nodes": n,
    }
    if cfg["strategy"] == "fedprox":
        return RecordingFedProx(proximal_mu=cfg["proximal-mu"], **kwargs)
    return RecordingFedAvg(**kwargs)
