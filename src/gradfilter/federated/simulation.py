"""One-machine federated runs on Flower's Simulation Engine (its Ray backend): the same
``ServerApp`` / ``ClientApp`` as in deployment, with ``num-clients`` virtual SuperNodes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import resolve_config

__all__ = ["run_simulation"]


def run_simulation(settings: Mapping[str, Any], workers: int | None = None) -> dict[str, Any]:
    """Run the federated fine-tuning that ``settings`` (run-config keys, see
    :data:`gradfilter.federated.DEFAULTS`) describes; return ``OUT/metrics.json``'s content.

    ``workers`` Ray actors (default: the CPU count, at most ``num-clients``) run the clients'
    rounds, each with ``client-threads`` torch threads.
    """
    cfg = resolve_config(settings)
    out = Path(cfg["out"])
    metrics_path = out / "metrics.json"
    if metrics_path.exists():
        raise ValueError(f"{metrics_path} already exists; choose another --out")
    # The apps resolve the settings again; an absolute `out` does not depend on their cwd.
    app_settings = {**settings, "out": str(out.resolve())}

    from flwr.simulation import run_simulation as flwr_run_simulation

    from .client_app import make_client_app
    from .server_app import make_server_app

    n_workers = workers or min(cfg["num-clients"], os.cpu_count() or 1)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": n_workers, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": logging.ERROR if cfg["quiet"] else logging.WARNING,
                      "log_to_driver": not cfg["quiet"]},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if cfg["quiet"]:
        flwr_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            flwr_run_simulation(
                server_app=make_server_app(app_settings),
                client_app=make_client_app(app_settings),
                num_supernodes=cfg["num-clients"],
                backend_config=backend_config,
            )
    finally:
        flwr_logger.setLevel(level)
        _reap_ray_orphans()
    if not metrics_path.is_file():
        raise RuntimeError(f"the Flower simulation ended without writing {metrics_path}; see "
                           f"the log above for the ServerApp's error")
    return json.loads(metrics_path.read_text(encoding="utf-8"))


def _ray_orphans() -> list[int]:
    """Ray worker processes of this process group that outlived their raylet (reparented to
    init). Seen once on a loaded machine: two ``ray::ClientAppActor`` kept spinning after
    ``ray.shutdown()``."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (proc / "cmdline").read_bytes().split(b"\0")[0]
        except (OSError, IndexError):
            continue
        if stat[0] != "Z" and int(stat[1]) == 1 and int(stat[2]) == os.getpgrp() \
                and cmd.startswith(b"ray::"):
            pids.append(int(proc.name))
    return pids


def _reap_ray_orphans(grace_s: float = 5.0) -> None:
    if not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + grace_s
    while (pids := _ray_orphans()) and time.monotonic() < deadline:
        time.sleep(0.25)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        pids = _ray_orphans()
        if not pids:
            break
    if pids:
        print(f"warning: Ray worker processes {pids} survived SIGKILL", file=sys.stderr)
