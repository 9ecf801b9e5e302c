"""The settings of one federated run, as Flower's flat run config (``key = value`` with hyphens,
TOML scalars) so that the same dict drives the simulation, ``flwr run --run-config`` and the
apps inside SuperLink / SuperNode processes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..surgery import BN_MODES
from ..train.trainer import METHODS
from .partition import parse_partition

__all__ = ["DEFAULTS", "STRATEGIES", "resolve_config"]

STRATEGIES = ("fedavg", "fedprox")
LEAN_MODES = ("", *BN_MODES)  # "" is off

DEFAULTS: dict[str, bool | int | float | str] = {
    "model": "tf_efficientnet_lite0",
    "pretrained": False,
    "data": "digits",
    "image-size": 64,
    "num-clients": 2,
    "partition": "iid",
    "seed": 0,
    "method": "filtered",
    "radius": 4,
    "train-last": 2,
    "lean": "",  # "" (the method's default), "exact", "patch" or "frozen": prepare_model's lean
    "local-epochs": 1,
    "batch-size": 32,
    "lr": 1e-3,
    "optimizer": "adamw",
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "rounds": 3,
    "fraction-train": 1.0,
    "round-timeout": 600.0,
    "client-threads": 1,
    "fault": "",
    "out": "runs/federated",
    "quiet": True,
}


def _fault(spec: str) -> dict[int, tuple[str, int]]:
    """``"raise:1@1,kill:2@2"`` -> ``{1: ("raise", 1), 2: ("kill", 2)}`` (client -> action,
    round). Fault injection for tests and demos of Flower's failure handling."""
    out: dict[int, tuple[str, int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, rest = item.partition(":")
        client, _, rnd = rest.partition("@")
        if action not in ("raise", "kill") or not client.isdigit() or not rnd.isdigit():
            raise ValueError(f"fault '{item}': expected raise:CLIENT@ROUND or kill:CLIENT@ROUND")
        out[int(client)] = (action, int(rnd))
    return out


def resolve_config(run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``DEFAULTS`` updated with ``run_config``, checked; unknown keys and bad values are a
    ``ValueError`` naming them."""
    run_config = dict(run_config or {})
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown federated setting(s): {', '.join(unknown)}; known: "
                         f"{', '.join(DEFAULTS)}")
    cfg: dict[str, Any] = {**DEFAULTS, **run_config}
    for key, default in DEFAULTS.items():
        kind = float if isinstance(default, float) else type(default)
        value = cfg[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ValueError(f"setting '{key}' must be {kind.__name__}, got {value!r}")
        cfg[key] = value
    parse_partition(cfg["partition"])
    if cfg["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg['method']!r}")
    if cfg["strategy"] not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {cfg['strategy']!r}")
    for key in ("num-clients", "rounds", "local-epochs", "batch-size", "image-size",
                "client-threads", "train-last"):
        if cfg[key] < 1:
            raise ValueError(f"'{key}' must be >= 1, got {cfg[key]}")
    if cfg["lean"] not in LEAN_MODES:
        raise ValueError(f"lean must be one of {LEAN_MODES} ('' is off), got {cfg['lean']!r}")
    if cfg["method"] != "vanilla" and cfg["radius"] < 1:
        raise ValueError(f"radius must be >= 1 for method {cfg['method']}, got {cfg['radius']}")
    if not cfg["lr"] > 0:
        raise ValueError(f"lr must be > 0, got {cfg['lr']}")
    if not 0 < cfg["fraction-train"] <= 1:
        raise ValueError(f"fraction-train must be in (0, 1], got {cfg['fraction-train']}")
    if not cfg["round-timeout"] > 0:
        raise ValueError(f"round-timeout must be > 0, got {cfg['round-timeout']}")
    if cfg["proximal-mu"] < 0:
        raise ValueError(f"proximal-mu must be >= 0, got {cfg['proximal-mu']}")
    cfg["faults"] = _fault(cfg["fault"])
    return cfg
