"""Filtered convolutions under DistributedDataParallel (gloo, 2 CPU processes): after one step
the gradients (and the updated weights) equal a single process's on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gradfilter
from gradfilter.blocks import FusedBlockMixin
from gradfilter.nn import FilteredConv2d

WORLD = 2
PER_RANK = 3
LR = 0.1
REPO = Path(__file__).resolve().parents[1]


def _model(fused: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if fused:  # an inverted residual run as one fused node (eval BatchNorm, fitted statistics)
        from torchvision.models.mobilenetv2 import InvertedResidual

        block = InvertedResidual(6, 6, 1, 4)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), block.eval(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
        gradfilter.apply(model, radius=2, names="2.*")
        gradfilter.fuse_blocks(model, ["2"])
        return model
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),  # a plain conv upstream: filtered grad_input flows in
        nn.ReLU(),
        FilteredConv2d(6, 8, 3, padding=1, radius=2),
        nn.ReLU(),
        FilteredConv2d(8, 8, 3, stride=2, padding=1, radius=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(WORLD * PER_RANK, 3, 12, 12, generator=g),
            torch.randint(0, 5, (WORLD * PER_RANK,), generator=g))


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {**grads, **{f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}}


def _worker(rank: int, store: str, out: str, fused: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        ddp = nn.parallel.DistributedDataParallel(_model(fused))
        x, y = _batch()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        result = _step(ddp, x[part], y[part])
        result = {k.replace("module.", "", 1): v for k, v in result.items()}
        torch.save(result, f"{out}.{rank}")
        # Both ranks finish before either tears gloo down: destroying the group while the
        # other rank still uses its pairs aborts the process ("terminate called without an
        # active exception"), a flake seen in about one run in five without this barrier.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fused", [False, True], ids=["per-layer", "fused-block"])
def test_ddp_gradients_equal_single_process_on_concatenated_batch(tmp_path, fused):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out, fused), nprocs=WORLD, join=True)

    x, y = _batch()
    reference = _step(_model(fused), x, y)  # one process, the whole batch
    model = _model(fused)
    filtered = {n for n, m in model.named_modules() if isinstance(m, FilteredConv2d)}
    assert len(filtered) == (3 if fused else 2)
    if fused:  # the block really runs as the fused node, not its per-layer fallback
        assert isinstance(model[2], FusedBlockMixin)
        probe = model[2](torch.randn(2, 6, 12, 12, requires_grad=True))
        # the reference path's Python Function node or the native C++ one, as test_blocks._node
        assert "FusedBlock" in probe.grad_fn.name()
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert set(got) == set(reference)
        for key, want in reference.items():
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank}: {key}")
    # The check has teeth: a rank's half-batch gradient alone differs from the full one.
    half = _step(_model(fused), x[:PER_RANK], y[:PER_RANK])
    key = "grad.2.conv.0.0.weight" if fused else "grad.2.weight"
    assert not torch.allclose(half[key], reference[key], atol=1e-4)


@pytest.mark.slow
def test_finetune_under_torchrun_two_processes(tmp_path):
    """The documented path: `torchrun --nproc-per-node 2 -m gradfilter.cli finetune ...`."""
    pytest.importorskip("timm")
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "gradfilter.cli",
         "finetune", "--model", "test_efficientnet", "--data", "digits", "--image-size", "16",
         "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--method", "filtered",
         "--radius", "2", "--train-last", "1", "--quiet", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    from gradfilter.train.checkpoint import load_training_checkpoint

    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["steps"] == (1437 // 2) // 16  # each rank: half of digits' 1437 training images
    ckpt = load_training_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])
