"""The planner's cost model: per block and per radius, bytes saved for backward, step time and
the docs/spec.md §7 FLOPs, so that the cost of any plan (train the last blocks, each at its own
radius)
is a sum of per-block terms plus a fixed part.

* saved bytes: two forwards per radius (batch 1 and 2) of the model with every block trainable
  and filtered at that radius, every storage autograd saves attributed to the block that saved
  it first (a storage shared with an earlier block is kept aside: it counts only for the first
  trainable block, whose frozen predecessor no longer saves it). Activations grow linearly with
  the batch, so ``a + b·N`` fits each term;
* time: an analytic model, ``step = base + sum over trainable blocks of c · features``, the
  features being the block's backward FLOPs of dense and of depthwise convs (docs/spec.md §7
  formulas: vanilla
  or filtered at the block's radius), the bytes of its conv input and output maps (the memory
  traffic of BN, activations, patch pooling), its parameter count (optimizer) and its number of
  filtered convs (the per-call overhead of the filtered op, which dominates on small maps).
  ``base`` (only the classifier trains) and the five coefficients ``c`` are calibrated by timing
  a few whole training steps on this machine: several suffix lengths at vanilla, and the whole
  and half suffix at every radius;
* FLOPs: docs/spec.md §7 formulas per conv from the traced shapes (``diagnostics.conv_costs``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diagnostics import conv_costs
from ..models.registry import block_names, classifier_name
from ..optim import fused_kwargs
from ..selection import trace
from ..surgery import apply, conv_layers, freeze

__all__ = ["BlockCost", "CostProfile", "VANILLA", "profile_model"]

VANILLA = 0  # the "radius" of an unfiltered block in profiles
TAIL = "<tail>"  # everything after the last block: pooling, classifier, loss


@dataclass
class BlockCost:
    """Costs of one block at each radius (``VANILLA`` = plain backprop)."""

    name: str
    convs: list[str]
    params: int
    saved: dict[int, tuple[float, float]] = field(default_factory=dict)  # r -> (a, b): a + b·N
    shared: dict[int, tuple[float, float]] = field(default_factory=dict)  # first-block extra
    features: dict[int, list[float]] = field(default_factory=dict)  # r -> FEATURES values
    flops_bwd: dict[int, int] = field(default_factory=dict)  # at the profiled batch
    flops_fwd: int = 0
    conv_saved: dict[int, int] = field(default_factory=dict)  # docs/spec.md §7 conv-only bytes
    skipped: dict[int, list[str]] = field(default_factory=dict)  # convs left plain at radius r

    def saved_bytes(self, r: int, batch: int, first: bool) -> float:
        a, b = self.saved[r]
        total = a + b * batch
        if first:
            sa, sb = self.shared[r]
            total += sa + sb * batch
        return total


@dataclass
class CostProfile:
    """Per-block costs of a model at one input shape, and the fixed parts around them."""

    model_name: str
    input_shape: tuple[int, ...]
    radii: tuple[int, ...]
    blocks: list[BlockCost]
    head: str | None
    tail_saved: tuple[float, float]
    base_ms: float  # a step with only the classifier trainable
    coef: list[float]  # ms per unit of each of FEATURES
    calibration: list[dict[str, Any]] = field(default_factory=list)

    def block_ms(self, k: int, r: int) -> float:
        return float(sum(c * f for c, f in zip(self.coef, self.blocks[k].features[r])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "radii": list(self.radii),
            "base_ms": self.base_ms,
            "coefficients": dict(zip(FEATURES, self.coef)),
            "timed_steps": self.calibration,
            "tail_saved": list(self.tail_saved),
        }


# ----------------------------------------------------------------------------------------------
# Model set-up for one profiling option


def _configure(model: nn.Module, blocks: list[str], head: str | None, radius: int) -> nn.Module:
    """A copy of ``model`` with ``blocks`` (and the head) trainable, filtered at ``radius``."""
    m = copy.deepcopy(model)
    if radius != VANILLA:
        apply(m, radius=radius, names=[f"{b}.*" for b in blocks] + blocks,
              on_unsupported="skip")
    freeze(m, trainable=blocks + ([head] if head else []), bn_eval=True)
    return m


def _modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    found = dict(model.named_modules())
    return {n: found[n] for n in names}


def synthetic_targets(out: Tensor, batch: int | None = None) -> Tensor:
    """Class targets that fit a model output: (N,) for logits (N, C), one class per pixel
    (N, H, W) for dense logits (N, C, H, W); classes cycle so that every one occurs. ``batch``
    overrides N (``out`` may then come from a one-sample forward)."""
    n, c, *spatial = out.shape
    n = n if batch is None else batch
    count = n * math.prod(spatial)
    return (torch.arange(count, device=out.device) % c).reshape(n, *spatial)


# ----------------------------------------------------------------------------------------------
# Saved bytes, attributed to blocks


@contextmanager
def _attributed_saves(model: nn.Module, blocks: dict[str, nn.Module]):
    """Attribute every distinct storage saved for backward to the block running when it was
    first saved; also sum, per block, storages it saves that an earlier block saved first."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owner: dict[int, str] = {}
    new: dict[str, int] = defaultdict(int)
    shared: dict[str, int] = defaultdict(int)
    seen: dict[str, set[int]] = defaultdict(set)
    stack: list[str] = []
    handles = []
    for name, mod in blocks.items():
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
        handles.append(mod.register_forward_hook(lambda m, a, o: stack.pop() and None))

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in skip:
            return t
        where = stack[-1] if stack else TAIL
        if ptr not in owner:
            owner[ptr] = where
            new[where] += storage.nbytes()
        elif owner[ptr] != where and ptr not in seen[where]:
            shared[where] += storage.nbytes()
        seen[where].add(ptr)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield new, shared
    finally:
        for h in handles:
            h.remove()


def _saved_profile(m: nn.Module, blocks: list[str], shape: Sequence[int]):
    """{block: (a, b)} for new and shared bytes, and the tail's (a, b), from batches 1 and 2."""
    mods = _modules(m, blocks)
    runs = []
    for n in (1, 2):
        x = torch.randn(n, *shape[1:])
        with _attributed_saves(m, mods) as (new, shared):
            out = m(x)
            loss = F.cross_entropy(out, synthetic_targets(out))
        del loss, out
        runs.append((dict(new), dict(shared)))

    def fit(key: str, which: int) -> tuple[float, float]:
        v1, v2 = runs[0][which].get(key, 0), runs[1][which].get(key, 0)
        return float(2 * v1 - v2), float(v2 - v1)

    return ({b: fit(b, 0) for b in blocks}, {b: fit(b, 1) for b in blocks}, fit(TAIL, 0))


# ----------------------------------------------------------------------------------------------
# Times: an analytic model, calibrated by timing whole training steps

FEATURES = ("dense_flops", "dw_flops", "map_bytes", "params", "filtered_convs")


def _step_ms(m: nn.Module, x: Tensor, repeats: int) -> float:
    """Median wall time (ms) of a training step as the trainer takes it: forward, loss,
    zero_grad, backward, AdamW step. One untimed warm-up step first. With nothing trainable (a
    model whose head is its last block) the step is the forward and the loss."""
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, **fused_kwargs(params)) if params else None
    m.train()
    with torch.no_grad():
        y = synthetic_targets(m(x[:1]), batch=x.shape[0])
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(opt is not None):
            loss = F.cross_entropy(m(x), y)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def _nnls(rows: list[list[float]], target: list[float]) -> list[float]:
    """Non-negative least squares for a handful of unknowns: the best unconstrained solution
    over every subset of features whose coefficients all come out >= 0."""
    a = np.asarray(rows, dtype=float)
    b = np.asarray(target, dtype=float)
    n = a.shape[1]
    best, best_res = np.zeros(n), float(np.sum(b**2))
    for mask in range(1, 2**n):
        cols = [i for i in range(n) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if np.any(coef < 0):
            continue
        res = float(np.sum((a[:, cols] @ coef - b) ** 2))
        if res < best_res:
            best_res = res
            best = np.zeros(n)
            best[cols] = coef
    return best.tolist()


# ----------------------------------------------------------------------------------------------


def _block_features(mod_of: dict[str, nn.Module], traced: dict, b: BlockCost, r: int,
                    batch_shape: Sequence[int]) -> None:
    """Fill ``b``'s docs/spec.md §7 FLOPs, conv-only saved bytes and time features at radius
    ``r``."""
    dense = dw = maps = filtered = 0
    flops = conv_bytes = 0
    for n in b.convs:
        if n not in traced:
            continue
        mod = mod_of[n]
        in_s, out_s, dtype = traced[n]
        elem = torch.empty((), dtype=dtype).element_size()
        cc = conv_costs(mod, in_s, out_s, max(r, 1), elem)
        plain = r == VANILLA or n in b.skipped.get(r, [])
        f = cc.flops_vanilla if plain else cc.flops_filtered
        filtered += 0 if plain else 1
        if mod.groups > 1 and mod.groups == mod.in_channels:
            dw += f
        else:
            dense += f
        flops += f
        conv_bytes += cc.saved_vanilla if plain else cc.saved_filtered
        maps += (math.prod(in_s) + math.prod(out_s)) * elem
        if r == VANILLA:
            b.flops_fwd += cc.forward_flops
    b.flops_bwd[r] = flops
    b.conv_saved[r] = conv_bytes
    b.features[r] = [float(dense), float(dw), float(maps), float(b.params), float(filtered)]


def profile_model(
    model: nn.Module,
    input_shape: Sequence[int],
    radii: Sequence[int],
    model_name: str = "",
    repeats: int = 3,
    progress: bool = False,
) -> CostProfile:
    """Calibrate the planner's cost model for ``model`` at ``input_shape`` (B, C, H, W) on this
    machine, for ``radii`` and vanilla; ``repeats`` timed steps per calibration config (0: no
    time model, saved bytes only). ``model`` is not modified."""
    input_shape = tuple(int(s) for s in input_shape)
    convs_all = conv_layers(model)
    if not convs_all:
        raise ValueError(f"{type(model).__name__} has no nn.Conv1d/nn.Conv2d modules to plan for")
    blocks = block_names(model)
    head = classifier_name(model)
    mods = _modules(model, blocks)
    block_convs = {
        b: [n for n, _ in convs_all if n == b or n.startswith(b + ".")] for b in blocks
    }
    if not any(block_convs.values()):
        raise ValueError(f"{type(model).__name__}: no convolutions inside its blocks {blocks}")
    x = torch.randn(*input_shape)
    traced = trace(model, dict(convs_all), x)
    if not traced:
        raise ValueError(f"no convolution ran on an input of shape {input_shape}")
    mod_of = dict(convs_all)
    costs = [
        BlockCost(name=b, convs=block_convs[b],
                  params=sum(p.numel() for p in mods[b].parameters()))
        for b in blocks
    ]
    options = [VANILLA, *radii]
    n = len(blocks)
    suffixes = sorted({n, max(1, -(-n // 2)), max(1, -(-n // 4))}, reverse=True)
    half = suffixes[min(1, len(suffixes) - 1)]
    timed = [(k, VANILLA) for k in suffixes] + [(n, r) for r in radii]
    timed += [(half, r) for r in radii if half != n]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(options) + len(timed) + 1, desc="calibrating", unit="config")

    def tick() -> None:
        if bar is not None:
            bar.update(1)

    tail_saved = (0.0, 0.0)
    for r in options:  # saved bytes: every block trainable at r
        m = _configure(model, blocks, head, r)
        converted = {name for name, mod in conv_layers(m) if hasattr(mod, "radius")}
        for c in costs:  # convs left plain at this radius (unsupported dilation)
            c.skipped[r] = [name for name in c.convs if r != VANILLA and name not in converted]
        new, shared, tail_saved = _saved_profile(m, blocks, input_shape)
        for c in costs:
            c.saved[r], c.shared[r] = new[c.name], shared[c.name]
            _block_features(mod_of, traced, c, r, input_shape)
        del m
        tick()
    if repeats < 1:  # saved bytes only: no time model
        timed = []
    base = _step_ms(_configure(model, [], head, VANILLA), x, repeats) if timed else 0.0
    tick()
    rows, target, calibration = [], [], []
    for k, r in timed:
        ms = _step_ms(_configure(model, blocks[-k:], head, r), x, repeats)
        feats = [sum(c.features[r][i] for c in costs[-k:]) for i in range(len(FEATURES))]
        extra = max(ms - base, 1e-3)
        rows.append([f / extra for f in feats])  # relative error: every config weighs alike
        target.append(1.0)
        calibration.append({"train_last": k, "radius": r, "measured_ms": ms, "features": feats})
        tick()
    if bar is not None:
        bar.close()
    coef = _nnls(rows, target) if rows else [0.0] * len(FEATURES)
    for row in calibration:
        row["fitted_ms"] = base + sum(c * f for c, f in zip(coef, row.pop("features")))
    return CostProfile(
        model_name=model_name, input_shape=input_shape, radii=tuple(radii), blocks=costs,
        head=head, tail_saved=tail_saved, base_ms=base, coef=coef, calibration=calibration,
    )
