"""Federated fine-tuning with the real Flower engine: partitions, the exchanged parameters, a
simulation with an injected client failure, and a real SuperLink + SuperNodes deployment on
loopback (2 clients x 2 rounds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gradfilter.federated import DEFAULTS, partition_indices, resolve_config

pytest.importorskip("flwr")
pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "deploy" / "flower"
BIN = Path(sys.executable).parent
# A tiny timm model at 16 px keeps each client round well under a second.
TINY = {"model": "test_efficientnet", "data": "digits", "image-size": 16, "train-last": 1,
        "radius": 2, "batch-size": 32}


# ---------------------------------------------------------------------------- partitions

def _labels(n: int = 600, classes: int = 10, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:100"])
def test_partition_is_disjoint_covering_and_deterministic(spec):
    labels = _labels()
    parts = partition_indices(labels, 7, spec, seed=3)
    assert len(parts) == 7 and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint and complete
    again = partition_indices(labels, 7, spec, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, 7, spec, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_balanced_and_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _labels(2000)
    sizes = [len(p) for p in partition_indices(labels, 8, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1

    def skew(spec: str) -> float:
        # mean total-variation distance between a client's label mix and the global one
        glob = np.bincount(labels, minlength=10) / len(labels)
        tv = []
        for p in partition_indices(labels, 8, spec, seed=0):
            mix = np.bincount(labels[p], minlength=10) / len(p)
            tv.append(0.5 * np.abs(mix - glob).sum())
        return float(np.mean(tv))

    assert skew("dirichlet:0.1") > skew("dirichlet:1") > skew("dirichlet:100")
    assert skew("dirichlet:0.1") > 0.4 and skew("iid") < 0.1


@pytest.mark.parametrize("spec", ["", "dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x",
                                  "iid:3", "shards:2"])
def test_bad_partition_spec_is_one_clear_error(spec):
    with pytest.raises(ValueError, match="partition"):
        partition_indices(_labels(), 3, spec)


def test_more_clients_than_samples_is_an_error():
    with pytest.raises(ValueError, match="clients"):
        partition_indices(_labels(5), 6, "iid")


# ---------------------------------------------------------------------------- settings

def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown federated setting"):
        resolve_config({"roundz": 3})
    with pytest.raises(ValueError, match="rounds"):
        resolve_config({"rounds": "3"})
    with pytest.raises(ValueError, match="strategy"):
        resolve_config({"strategy": "fedsgd"})
    with pytest.raises(ValueError, match="fault"):
        resolve_config({"fault": "explode:1@1"})
    assert resolve_config({"fault": "raise:1@2,kill:0@1"})["faults"] == {
        1: ("raise", 2), 0: ("kill", 1)}
    with pytest.raises(ValueError, match="lean must be one of"):
        resolve_config({"lean": "bits"})
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_config({"method": "gradfilter"})
    with pytest.raises(ValueError, match="unknown federated setting"):
        resolve_config({"fuse-blocks": True})


def test_lean_and_fused_clients_train_the_same_parameters():
    """The lean and fused methods change how a client backpropagates, not what travels."""
    from gradfilter.blocks import FusedBlockMixin, FusedHeadMixin
    from gradfilter.federated.task import build_model, trainable_state

    base = {**TINY, "model": "tf_efficientnet_lite0", "image-size": 32, "train-last": 2}
    plain, _ = build_model(resolve_config(base))
    model, info = build_model(resolve_config({**base, "method": "fused"}))
    assert info.fused == ["blocks.6.0", "conv_head"] and info.slimmed
    assert isinstance(model, FusedHeadMixin) and isinstance(model.blocks[6][0], FusedBlockMixin)
    assert set(trainable_state(model)) == set(trainable_state(plain))
    x = torch.randn(4, 3, 32, 32)
    seen = {}
    model.global_pool.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("fn", a[0].grad_fn.name()))
    model(x).sum().backward()
    assert "FusedBlock" in seen["fn"]  # the fused node (the reference or the native path's)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_deployment_app_config_matches_the_defaults():
    """`flwr run --run-config` only accepts keys the Flower App's pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(APP_DIR / "pyproject.toml", "rb") as f:
        app = tomllib.load(f)["tool"]["flwr"]["app"]
    assert app["config"] == DEFAULTS
    assert app["components"] == {"serverapp": "gradfilter.federated.server_app:app",
                                 "clientapp": "gradfilter.federated.client_app:app"}


# ---------------------------------------------------------------------------- exchanged state

def test_only_trainable_parameters_travel_and_load_back():
    from flwr.app import ArrayRecord

    from gradfilter.federated.task import build_model, load_trainable, trainable_state

    cfg = resolve_config({**TINY, "train-last": 2})
    model, info = build_model(cfg)
    state = trainable_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable and len(trainable) < len(list(model.parameters()))
    assert sum(v.numel() for v in state.values()) == info.trainable_params
    record = ArrayRecord(state)
    assert record.count_bytes() < ArrayRecord(model.state_dict()).count_bytes()

    other, _ = build_model(cfg)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(1.0)
    load_trainable(other, record.to_torch_state_dict())
    for (n, p), (_, q) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="do not fit"):
        load_trainable(other, {k: v for k, v in list(state.items())[1:]})


# ---------------------------------------------------------------------------- simulation

def test_simulation_survives_a_failing_client_and_records_it(tmp_path):
    """Flower's simulation engine (Ray): 3 clients, FedProx, client 1 raises in round 1. The
    round aggregates the other two, the failure is in metrics.json, round 2 has all three."""
    from gradfilter.compare import compare_runs
    from gradfilter.federated import run_simulation

    out = tmp_path / "run"
    m = run_simulation({**TINY, "num-clients": 3, "rounds": 2, "strategy": "fedprox",
                        "partition": "dirichlet:1.0", "fault": "raise:1@1", "out": str(out),
                        "quiet": True}, workers=2)
    assert json.loads((out / "metrics.json").read_text()) == m
    from gradfilter.federated.simulation import _ray_orphans

    assert not _ray_orphans()  # no Ray worker outlives the run
    assert m["flower_strategy"] == "FedProx"
    r1, r2 = m["rounds_log"]
    assert (r1["clients_ok"], r1["clients_failed"]) == (2, 1)
    assert "injected fault: client 1 fails in round 1" in r1["failures"][0]["reason"]
    assert sorted(c["partition_id"] for c in r1["clients"]) == [0, 2]
    assert (r2["clients_ok"], r2["clients_failed"]) == (3, 0)
    assert m["total_failures"] == 1
    # Each client sent exactly the trainable parameters, far less than the whole model.
    for r in (r1, r2):
        assert r["bytes_sent_by_clients"] == r["clients_ok"] * m["trainable_bytes"]
        assert all(c["full_model_bytes"] > 2 * c["bytes_sent"] for c in r["clients"])
    # The global model moved: accuracy changed and the saved trainable weights differ from
    # the seeded start.
    from gradfilter.federated.task import build_model, trainable_state

    start = trainable_state(build_model(resolve_config(TINY))[0])
    final = torch.load(m["global_model"], weights_only=True)
    assert set(final) == set(start)
    assert any(not torch.equal(final[k], start[k]) for k in start)
    # `gradfilter compare` reads the federated run and plots it per round.
    assert compare_runs([out], out=tmp_path / "cmp.png") == 0
    assert (tmp_path / "cmp_rounds.png").stat().st_size > 0


# ---------------------------------------------------------------------------- deployment

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Fleet:
    """A SuperLink and SuperNodes as separate processes (own process groups, so that their
    SuperExec / ClientApp children are stopped too)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_HOME": str(tmp / "flwr_home")}
        self.link_port = _free_port()

    def start(self, *cmd: str, log: str) -> subprocess.Popen:
        f = open(self.tmp / log, "wb")
        p = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=self.env,
                             cwd=self.tmp, start_new_session=True)
        f.close()
        self.procs.append(p)
        return p

    def up(self, clients: int) -> None:
        home = self.tmp / "flwr_home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n')
        self.start(str(BIN / "flower-superlink"), "--insecure", "--port", str(self.link_port),
                   "--disable-runtime-dependency-installation", log="superlink.log")
        for i in range(clients):
            self.start(str(BIN / "flower-supernode"), "--insecure", "--superlink",
                       f"127.0.0.1:{self.link_port}", "--port", str(_free_port()),
                       "--node-config", f"partition-id={i} num-partitions={clients}",
                       log=f"supernode{i}.log")

    def run(self, run_config: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), "run", str(APP_DIR), "loopback", "--stream",
             "--run-config", run_config],
            env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=timeout)

    def down(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group's leftovers, if any
            except ProcessLookupError:
                pass
            p.wait(timeout=5)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted(self.tmp.glob("*.log")))


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of group ``pgid`` remains: zombies left to an init
    that does not reap them would make ``killpg(pgid, 0)`` succeed forever."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _deploy(tmp_path: Path, clients: int, extra: str, timeout: float) -> dict:
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.skip("flwr's deployment executables are not installed next to this Python")
    # Build the native kernels (cached per machine) before the clients start: a first-use build
    # inside a client's round (10-20 s) would run into the short round timeouts below.
    from gradfilter import native

    native.available()
    out = tmp_path / "out"
    fleet = _Fleet(tmp_path)
    try:
        fleet.up(clients)
        run_config = (f'model="{TINY["model"]}" data="digits" image-size=16 train-last=1 '
                      f'radius=2 num-clients={clients} rounds=2 out="{out}" {extra}')
        done = fleet.run(run_config, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + fleet.logs()
        # `flwr run --stream` returns when the run ends; the ServerApp has written its metrics.
        deadline = time.monotonic() + 10
        while not (out / "metrics.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "metrics.json").exists(), done.stdout[-3000:] + fleet.logs()
        return json.loads((out / "metrics.json").read_text())
    finally:
        fleet.down()
        deadline = time.monotonic() + 10
        while any(_group_alive(p.pid) for p in fleet.procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [p.pid for p in fleet.procs if _group_alive(p.pid)]
        assert not alive, f"process groups still alive after cleanup: {alive}"


def test_real_deployment_on_loopback_two_clients_two_rounds(tmp_path):
    """`flower-superlink`, two `flower-supernode`s and `flwr run` as separate processes."""
    m = _deploy(tmp_path, clients=2, extra="", timeout=150)
    assert [r["round"] for r in m["rounds_log"]] == [1, 2]
    for r in m["rounds_log"]:
        assert (r["clients_ok"], r["clients_failed"]) == (2, 0)
        assert sorted(c["partition_id"] for c in r["clients"]) == [0, 1]
        assert r["bytes_sent_by_clients"] == 2 * m["trainable_bytes"]
    assert m["trainable_bytes"] < m["full_model_bytes"]
    assert m["val_accuracy"] != m["initial_val_accuracy"]


@pytest.mark.slow
def test_real_deployment_survives_a_client_killed_mid_round(tmp_path):
    """Client 1's ClientApp process is SIGKILLed in round 1 while it holds the round's
    message: the server waits out the round timeout, aggregates client 0 and goes on."""
    m = _deploy(tmp_path, clients=2, extra='fault="kill:1@1" round-timeout=20.0', timeout=240)
    r1 = m["rounds_log"][0]
    assert (r1["clients_ok"], r1["clients_failed"]) == (1, 1)
    assert [c["partition_id"] for c in r1["clients"]] == [0]
    assert "timeout" in r1["failures"][0]["reason"]
    assert len(m["rounds_log"]) == 2 and m["rounds_log"][1]["clients_ok"] >= 1


# ---------------------------------------------------------------------------- CLI

def test_cli_federated_bad_input_exits_2(capsys):
    from gradfilter.cli import main

    rc = main(["federated", "--model", "test_efficientnet", "--data", "digits", "--clients",
               "2", "--rounds", "1", "--method", "vanilla", "--train-last", "1",
               "--partition", "dirichlet:-2", "--out", "unused"])
    assert rc == 2
    assert "ALPHA must be a positive number" in capsys.readouterr().err
