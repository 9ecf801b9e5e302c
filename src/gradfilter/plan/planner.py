"""Choose which blocks train and each conv's radius under a memory and/or time budget.

The rule (docs/planner.md): the trainable part is the last N blocks (everything after the first
trainable block saves activations anyway, so a suffix is what a budget buys). Each block gets one
radius for all its convs. A plan's score is the number of trainable convs weighted by the
fidelity of the gradient each one gets: ``sum over trainable convs of w(block) * max(0, cos(
filtered gW, exact gW))`` at the conv's radius (:func:`gradfilter.diagnostics.inspect`), where
``w(block)`` is the product of the *transmissions* of the trained blocks after it (the input-
gradient cosine of each of them filtered alone, :func:`gradfilter.diagnostics.block_transmission`):
the gradient a block receives has passed through every filtered block downstream. For every N the
search starts with every block at its cheapest radius and then repeatedly moves one block to
another radius, taking the move with the largest score gain per share of budget used, while the
plan stays within budget; the best-scoring N wins.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..diagnostics import block_transmission, inspect
from ..models.registry import block_names
from ..surgery import conv_layers
from .profile import CostProfile, profile_model, synthetic_targets

__all__ = [
    "FORMAT", "Plan", "apply_plan", "load_plan", "make_plan", "parse_bytes", "parse_ms", "predict",
]

FORMAT = "gradfilter-plan/1"
FIDELITY_BATCH = 8  # samples used to measure fidelity (a cap on the planned batch)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str | int | float) -> int:
    """``"20MB"`` -> 20_000_000, ``"20MiB"`` -> 20_971_520, ``"512"`` -> 512 bytes."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory budget {text!r} is not a size like 20MB, 512KiB or 1.5GB")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory budget must be > 0, got {text!r}")
    return int(value)


def parse_ms(text: str | int | float) -> float:
    """``"300ms"`` -> 300.0, ``"1.5s"`` -> 1500.0, ``"300"`` -> 300.0 (milliseconds)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|)\s*", text.lower())
        if not m:
            raise ValueError(f"time budget {text!r} is not a duration like 300ms or 1.5s")
        value = float(m.group(1)) * (1000.0 if m.group(2) == "s" else 1.0)
    if value <= 0:
        raise ValueError(f"time budget must be > 0, got {text!r}")
    return value


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB ({int(round(n))} bytes)"


@dataclass
class Plan:
    """Which blocks train, each conv's radius, and the predicted costs (see ``to_dict``)."""

    model: str
    input_shape: tuple[int, ...]
    blocks: list[dict[str, Any]]  # name, radius, score, saved_bytes, step_ms, backward_flops
    layers: dict[str, int]  # conv name -> radius: what apply_plan / finetune --plan use
    predicted_saved_bytes: int
    predicted_step_ms: float
    predicted_backward_flops: int
    predicted_forward_flops: int
    analytic_conv_saved_bytes: int
    objective: float
    memory_budget: int | None = None
    time_budget_ms: float | None = None
    radii: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train_last(self) -> int:
        return len(self.blocks)

    @property
    def block_names(self) -> list[str]:
        return [b["name"] for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "radii": list(self.radii),
            "memory_budget": self.memory_budget,
            "time_budget_ms": self.time_budget_ms,
            "train_last": self.train_last,
            "predicted_saved_bytes": self.predicted_saved_bytes,
            "predicted_step_ms": self.predicted_step_ms,
            "predicted_backward_flops": self.predicted_backward_flops,
            "predicted_forward_flops": self.predicted_forward_flops,
            "analytic_conv_saved_bytes": self.analytic_conv_saved_bytes,
            "objective": self.objective,
            "blocks": self.blocks,
            "layers": self.layers,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a gradfilter plan (format {d.get('format')!r}, "
                             f"expected {FORMAT!r})")
        try:
            layers = {str(k): int(v) for k, v in d["layers"].items()}
            known = {"format", "model", "input_shape", "radii", "memory_budget",
                     "time_budget_ms", "train_last", "predicted_saved_bytes",
                     "predicted_step_ms", "predicted_backward_flops", "predicted_forward_flops",
                     "analytic_conv_saved_bytes", "objective", "blocks", "layers"}
            return cls(
                model=d["model"], input_shape=tuple(d["input_shape"]), blocks=list(d["blocks"]),
                layers=layers, predicted_saved_bytes=int(d["predicted_saved_bytes"]),
                predicted_step_ms=float(d["predicted_step_ms"]),
                predicted_backward_flops=int(d.get("predicted_backward_flops", 0)),
                predicted_forward_flops=int(d.get("predicted_forward_flops", 0)),
                analytic_conv_saved_bytes=int(d.get("analytic_conv_saved_bytes", 0)),
                objective=float(d.get("objective", 0.0)),
                memory_budget=d.get("memory_budget"), time_budget_ms=d.get("time_budget_ms"),
                radii=tuple(d.get("radii", ())),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed plan: missing or bad entry {exc}") from None

    def save(self, path: str | Path) -> Path:
        from ..files import write_json_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.to_dict(), path)
        return path

    def table(self) -> str:
        head = ("block", "r", "fidelity", "saved MB", "step ms", "bwd MFLOP")
        rows = [(b["name"], str(b["radius"]), f"{b['fidelity']:.3f}",
                 f"{b['saved_bytes'] / 1e6:.2f}", f"{b['step_ms']:.1f}",
                 f"{b['backward_flops'] / 1e6:.1f}") for b in self.blocks]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"train last {self.train_last} blocks: predicted "
            f"{_fmt_bytes(self.predicted_saved_bytes)} saved for backward, "
            f"{self.predicted_step_ms:.0f} ms/step, "
            f"{self.predicted_backward_flops / 1e9:.2f} GFLOP backward (convs); "
            f"score {self.objective:.2f}")
        return "\n".join(lines)


def load_plan(path: str | Path) -> Plan:
    """Read a ``plan.json`` written by :func:`make_plan` / ``gradfilter plan``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"plan {path} is not valid JSON: {exc}") from None
    return Plan.from_dict(data)


# ----------------------------------------------------------------------------------------------
# Search


def _fidelity_batches(model: nn.Module, profile: CostProfile,
                      batches: Iterable | None) -> list:
    """The batch fidelity is measured on: the first of ``batches`` cut to FIDELITY_BATCH
    samples, or a seeded random one."""
    if batches is not None:
        for x, y in batches:
            return [(x[:FIDELITY_BATCH], y[:FIDELITY_BATCH])]
    b, *rest = profile.input_shape
    n = min(b, FIDELITY_BATCH)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *rest, generator=gen)
    with torch.no_grad():
        out = model.eval()(x[:1])
    return [(x, synthetic_targets(out, batch=n))]


def _fidelity(model: nn.Module, profile: CostProfile, radii: Sequence[int],
              batches: list, progress: bool, loss_fn: Callable | None = None
              ) -> dict[tuple[str, int], float]:
    """max(0, weight-gradient cosine) of every conv in a block at every radius."""
    convs = [n for b in profile.blocks for n in b.convs]
    report = inspect(model, batches, layers=convs, radii=radii, max_batches=1, progress=progress,
                     loss_fn=loss_fn)
    return {(r.layer, r.radius): max(0.0, r.cos_weight) for r in report.rows
            if not math.isnan(r.cos_weight)}


def _transmission(model: nn.Module, profile: CostProfile, radii: Sequence[int],
                  batches: list, loss_fn: Callable | None = None
                  ) -> dict[tuple[str, int], float]:
    """max(0, block input-gradient cosine) of every block filtered alone at every radius."""
    t = block_transmission(model, batches, [b.name for b in profile.blocks], radii,
                           loss_fn=loss_fn)
    return {k: max(0.0, v) for k, v in t.items()}


class _Costs:
    """Per-block, per-radius costs and scores of one profile, for the search."""

    def __init__(self, profile: CostProfile, fid: dict[tuple[str, int], float],
                 trans: dict[tuple[str, int], float] | None = None):
        self.p = profile
        self.batch = profile.input_shape[0]
        self.fid = fid
        self.trans = trans or {}

    def score(self, k: int, r: int) -> float:
        """Σ over block k's convs of their weight-gradient fidelity at radius r."""
        b = self.p.blocks[k]
        return sum(1.0 if n in b.skipped.get(r, []) else self.fid.get((n, r), 0.0)
                   for n in b.convs)

    def transmission(self, k: int, r: int) -> float:
        return self.trans.get((self.p.blocks[k].name, r), 1.0)

    def weights(self, radii: dict[int, int]) -> dict[int, float]:
        """Each trained block's gradient-path weight: the product of the transmissions of the
        trained blocks after it (the gradient it receives passed through their filters)."""
        out, carry = {}, 1.0
        for k in sorted(radii, reverse=True):
            out[k] = carry
            carry *= self.transmission(k, radii[k])
        return out

    def objective(self, radii: dict[int, int]) -> float:
        w = self.weights(radii)
        return sum(w[k] * self.score(k, r) for k, r in radii.items())

    def mem(self, k: int, r: int, first: bool) -> float:
        return self.p.blocks[k].saved_bytes(r, self.batch, first)

    def ms(self, k: int, r: int) -> float:
        return self.p.block_ms(k, r)

    def base_mem(self) -> float:
        a, b = self.p.tail_saved
        return a + b * self.batch

    def base_ms(self) -> float:
        return self.p.base_ms

    def totals(self, start: int, radii: dict[int, int]) -> tuple[float, float, float]:
        mem = self.base_mem() + sum(self.mem(k, r, k == start) for k, r in radii.items())
        ms = self.base_ms() + sum(self.ms(k, r) for k, r in radii.items())
        return mem, ms, self.objective(radii)


def predict(profile: CostProfile, radii: Sequence[int]) -> tuple[float, float]:
    """(saved bytes, step ms) the cost model predicts for training the last ``len(radii)``
    blocks, block i of them at radius ``radii[i]`` (0: vanilla)."""
    n = len(profile.blocks)
    if not 1 <= len(radii) <= n:
        raise ValueError(f"radii must name 1..{n} blocks, got {len(radii)}")
    start = n - len(radii)
    mem, ms, _ = _Costs(profile, {}).totals(start, dict(zip(range(start, n), radii)))
    return mem, ms


def _fits(mem: float, ms: float, mem_budget: float | None, ms_budget: float | None) -> bool:
    return (mem_budget is None or mem <= mem_budget) and (ms_budget is None or ms <= ms_budget)


def _search(costs: _Costs, radii: Sequence[int], mem_budget: float | None,
            ms_budget: float | None) -> tuple[int, dict[int, int]] | None:
    n = len(costs.p.blocks)
    best: tuple[float, float, int, dict[int, int]] | None = None
    for start in range(n - 1, -1, -1):
        ks = range(start, n)

        def share(k: int, r: int, start: int = start) -> float:
            return ((costs.mem(k, r, k == start) / mem_budget if mem_budget else 0.0)
                    + (costs.ms(k, r) / ms_budget if ms_budget else 0.0))

        chosen = {k: min(radii, key=lambda r, k=k: (share(k, r), -r)) for k in ks}  # cheapest
        mem, ms, score = costs.totals(start, chosen)
        if not _fits(mem, ms, mem_budget, ms_budget):
            continue
        while True:
            moves = []
            for k in ks:
                for r in radii:
                    if r == chosen[k]:
                        continue
                    trial = {**chosen, k: r}
                    m2, t2, s2 = costs.totals(start, trial)
                    gain = s2 - score
                    if gain <= 1e-9:
                        continue
                    if not _fits(m2, t2, mem_budget, ms_budget):
                        continue
                    use = 0.0
                    if mem_budget is not None:
                        use += max(0.0, m2 - mem) / mem_budget
                    if ms_budget is not None:
                        use += max(0.0, t2 - ms) / ms_budget
                    moves.append((gain / max(use, 1e-12), gain, k, r))
            if not moves:
                break
            _, _, k, r = max(moves)
            chosen[k] = r
            mem, ms, score = costs.totals(start, chosen)
        key = (score, -mem)
        if best is None or key > (best[0], best[1]):
            best = (score, -mem, start, dict(chosen))
    if best is None:
        return None
    return best[2], best[3]


def _smallest(costs: _Costs, radii: Sequence[int]) -> tuple[float, float]:
    """The least memory and the least time any plan needs (each on its own)."""
    n = len(costs.p.blocks)
    k = n - 1
    mem = min(costs.base_mem() + costs.mem(k, r, True) for r in radii)
    ms = min(costs.base_ms() + costs.ms(k, r) for r in radii)
    return mem, ms


def make_plan(
    model: nn.Module,
    input_shape: Sequence[int],
    radii: Sequence[int] = (2, 4, 7),
    memory_budget: int | str | None = None,
    time_budget_ms: float | str | None = None,
    model_name: str = "",
    fidelity_batches: Iterable | None = None,
    profile: CostProfile | None = None,
    repeats: int = 3,
    progress: bool = False,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> Plan:
    """Plan fine-tuning ``model`` at ``input_shape`` (B, C, H, W) within the budgets.

    ``memory_budget``: bytes saved for backward per step (int or "20MB"); ``time_budget_ms``:
    training step time (float ms or "300ms"). ``fidelity_batches``: real ``(inputs, targets)``
    batches for the fidelity measurement (default: one random batch with cycling class targets,
    per pixel for dense outputs); ``loss_fn(output, targets)`` their loss (default
    cross-entropy; segmentation data with an ignore label needs its own). An impossible budget
    is a ValueError naming the smallest feasible one.
    """
    if len(input_shape) != 4 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input shape must be B,C,H,W positive ints, got {tuple(input_shape)}")
    radii = tuple(sorted({int(r) for r in radii}))
    if not radii or radii[0] < 1:
        raise ValueError(f"radii must be ints >= 1, got {radii}")
    mem_budget = parse_bytes(memory_budget) if memory_budget is not None else None
    ms_budget = parse_ms(time_budget_ms) if time_budget_ms is not None else None
    if profile is None:
        profile = profile_model(model, input_shape, radii, model_name=model_name,
                                repeats=repeats, progress=progress)
    batches = _fidelity_batches(model, profile, fidelity_batches)
    costs = _Costs(profile, _fidelity(model, profile, radii, batches, progress, loss_fn),
                   _transmission(model, profile, radii, batches, loss_fn))
    found = _search(costs, radii, mem_budget, ms_budget)
    if found is None:
        least_mem, least_ms = _smallest(costs, radii)
        last = profile.blocks[-1].name
        parts = []
        if mem_budget is not None and mem_budget < least_mem:
            parts.append(f"memory budget {_fmt_bytes(mem_budget)} is below the smallest "
                         f"feasible {_fmt_bytes(least_mem)} (only {last} trained)")
        if ms_budget is not None and ms_budget < least_ms:
            parts.append(f"time budget {ms_budget:.0f} ms is below the smallest feasible "
                         f"{least_ms:.0f} ms (only {last} trained)")
        if not parts:
            parts.append("no plan meets both budgets at once; raise one of them")
        raise ValueError("; ".join(parts))
    start, chosen = found
    mem, ms, score = costs.totals(start, chosen)
    path_weight = costs.weights(chosen)
    blocks, layers = [], {}
    fwd_flops = sum(b.flops_fwd for b in profile.blocks)
    bwd_flops = conv_bytes = 0
    for k, r in sorted(chosen.items()):
        b = profile.blocks[k]
        for n in b.convs:
            if n not in b.skipped.get(r, []):
                layers[n] = r
        bwd_flops += b.flops_bwd[r]
        conv_bytes += b.conv_saved[r]
        blocks.append({
            "name": b.name, "radius": r, "convs": len(b.convs),
            "fidelity": costs.score(k, r) / max(len(b.convs), 1),
            "transmission": costs.transmission(k, r), "path_weight": path_weight[k],
            "saved_bytes": int(round(costs.mem(k, r, k == start))),
            "step_ms": costs.ms(k, r), "backward_flops": b.flops_bwd[r],
        })
    from ..machine import machine_info

    return Plan(
        model=model_name, input_shape=tuple(profile.input_shape), blocks=blocks, layers=layers,
        predicted_saved_bytes=int(round(mem)), predicted_step_ms=ms,
        predicted_backward_flops=bwd_flops, predicted_forward_flops=fwd_flops,
        analytic_conv_saved_bytes=conv_bytes, objective=score, memory_budget=mem_budget,
        time_budget_ms=ms_budget, radii=radii,
        extra={"machine": machine_info("cpu"), "calibration": profile.to_dict()},
    )


def apply_plan(model: nn.Module, plan: Plan | Mapping[str, Any] | str | Path,
               example_input: Any) -> tuple[nn.Module, Any]:
    """Set ``model`` up as ``plan`` says (same blocks trainable, same radius per conv) with
    :func:`gradfilter.train.prepare_model`; return ``(model, PrepareInfo)``."""
    from ..train.trainer import prepare_model

    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    elif isinstance(plan, Mapping):
        plan = Plan.from_dict(plan)
    convs = {n for n, _ in conv_layers(model)}
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolutions; the plan cannot apply")
    unknown = sorted(set(plan.layers) - convs)
    if unknown:
        raise ValueError(f"plan names layers this model does not have: {', '.join(unknown[:5])}"
                         f" (plan made for model {plan.model!r})")
    names = block_names(model)
    if names[-plan.train_last:] != plan.block_names:
        raise ValueError(f"plan blocks {plan.block_names} are not this model's last "
                         f"{plan.train_last} blocks {names[-plan.train_last:]}")
    return prepare_model(model, "filtered", dict(plan.layers), plan.train_last, example_input)
