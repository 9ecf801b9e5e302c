"""Shared pieces of the in-process A/B benchmarks: the fused cases, one training batch, the
command line, a module flag's forms, the vanilla and fused models of a case, training steps
alternating between two forms of one model, a fresh worker process, and writing a result file
with the machine it ran on."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gradfilter.allocator import tune_cpu_allocator
from gradfilter.bench.machine import machine_info

# MobileNetV2's and EfficientNet-Lite0's last 4 / last 8 blocks: the cases fused blocks change
FUSED_CASES = [("mobilenet_v2", 4), ("mobilenet_v2", 8), ("tf_efficientnet_lite0", 4),
               ("tf_efficientnet_lite0", 8)]


def step_batch(batch: int = 16, size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    """The step benchmark's seeded batch: ImageNet-sized images and labels."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, size, size, generator=gen),
            torch.randint(0, 1000, (batch,), generator=gen))


def save(out: Path | None, rows: list[dict], **extra) -> None:
    """Write ``{"machine", **extra, "rows"}`` as JSON to ``out`` (nothing without one)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine_info(), **extra, "rows": rows}, indent=1))


def parse_args(doc: str, *extra: tuple[tuple, dict]) -> argparse.Namespace:
    """``--repeats`` (default 30) and ``--out`` plus ``extra`` (``(names, kwargs)`` pairs for
    ``add_argument``), described by ``doc``'s first paragraph; tunes the allocator (every A/B
    script runs with it, as the step benchmark does)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for names, kwargs in extra:
        ap.add_argument(*names, **kwargs)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tune_cpu_allocator()
    return args


@contextlib.contextmanager
def flag_forms(obj: Any, name: str, **values: Any) -> Iterator[dict[str, Callable[[], None]]]:
    """Per form, a callable that sets ``obj.name`` to that form's value (the ``forms`` of
    :func:`alternate_steps`); ``obj.name`` gets its value back on exit."""
    before = getattr(obj, name)
    try:
        yield {k: (lambda v=v: setattr(obj, name, v)) for k, v in values.items()}
    finally:
        setattr(obj, name, before)


class NativeSwitch:
    """A native on/off setting (``set_fn(enabled) -> previous``, such as
    ``native.set_fused_hand_off``) as an ``enabled`` attribute, for :func:`fused_flag_steps`."""

    def __init__(self, set_fn: Callable[[bool], bool]) -> None:
        self._set = set_fn

    @property
    def enabled(self) -> bool:
        previous = self._set(True)
        self._set(previous)
        return previous

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._set(value)


def flag_ab_main(doc: str, obj: Any, name: str, off: str, on: str, change: str,
                 cases: list[tuple[str, int]] = FUSED_CASES, cached: bool = True,
                 counter: Callable[[], int] | None = None) -> int:
    """The main of an A/B script over one module flag (``obj.name``, False in form ``off``,
    True in form ``on``; a native on/off setting through :class:`NativeSwitch`): each case's
    fused model in training steps alternating the two forms (:func:`fused_flag_steps`), its
    forward and backward medians and paired savings printed (``change`` says what ``on``
    changes) and saved to ``--out``; ``counter``: a native count of the ``on`` form's uses,
    recorded per case as ``uses``."""
    from gradfilter.bench.machine import describe

    args = parse_args(doc)
    rows = []
    for model, last in cases:
        before = counter() if counter else 0
        times = fused_flag_steps(model, last, args.repeats, obj, name, cached=cached,
                                 **{off: False, on: True})
        row = {"model": model, "last": last, **phase_medians(times),
               **paired_differences(times, off, on)}
        if counter:
            row["uses"] = counter() - before
        rows.append(row)
    print(describe(machine_info()))
    for r in rows:
        uses = f"; {r['uses']} uses" if counter else ""
        print(f"{r['model']:22s} last {r['last']}: forward {r[f'forward_ms_{off}']:.2f} -> "
              f"{r[f'forward_ms_{on}']:.2f} ms (paired {r['forward_saved_ms_paired']:+.2f} ms "
              f"saved), backward {r[f'backward_ms_{off}']:.2f} -> {r[f'backward_ms_{on}']:.2f} "
              f"ms (paired {r['backward_saved_ms_paired']:+.2f} ms saved) ({change}{uses})")
    save(args.out, rows)
    return 0


def vanilla_and_fused(model: str, last: int, x: torch.Tensor) -> tuple[tuple, tuple]:
    """The case's vanilla and fused (model, optimizer), built as ``gradfilter bench step``
    builds them (r=4), in training mode."""
    from gradfilter.bench.step import build

    pairs = []
    for method in ("vanilla", "fused"):
        net, opt, _ = build(model, method, last, 4, x[:2])
        pairs.append((net.train(), opt))
    return pairs[0], pairs[1]


def fused_flag_steps(model: str, last: int, repeats: int, obj: Any, name: str,
                     cached: bool = False,
                     **values: Any) -> dict[str, list[tuple[float, float]]]:
    """Training steps of the case's fused model (built as ``gradfilter bench step`` builds it)
    alternating between the forms of ``obj.name`` (:func:`flag_forms`): the times of
    :func:`alternate_steps`. ``cached``: the frozen prefix runs once and each step starts at the
    first trainable block (as with ``--cache-features``), so the frozen forward's noise does
    not bury a sub-millisecond change in the forward."""
    from gradfilter.bench.step import build
    from gradfilter.train.cache import _capture, find_prefix, skip_prefix

    x, y = step_batch()
    net, opt, names = build(model, "fused", last, 4, x[:2])
    net.train()
    skip = contextlib.nullcontext()
    if cached:
        prefix = find_prefix(net, names[0], x[:2])
        x = _capture(net, names[0], x)
        skip = skip_prefix(net, prefix)
    with skip, flag_forms(obj, name, **values) as forms:
        return alternate_steps(net, opt, x, y, forms, repeats)


def _with_threads(threads: int, fn: Callable[..., Any], args: tuple) -> Any:
    torch.set_num_threads(threads)
    return fn(*args)


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a newly spawned process with this one's torch thread count: each call
    samples the VM's state anew (``bench.machine.cross_core_read_ratio``)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_with_threads, (torch.get_num_threads(), fn, args))


def alternate_steps(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor, forms: dict[str, Callable[[], None]], repeats: int,
                    warmup: int = 3) -> dict[str, list[tuple[float, float]]]:
    """Training steps of ``net`` alternating between ``forms`` (each a callable that switches
    the model to that form), order flipped every round: per form, the (forward + loss,
    backward) seconds of each round after ``warmup`` dropped ones."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in forms}
    for i in range(repeats + warmup):
        for k in (list(forms) if i % 2 == 0 else list(reversed(forms))):
            forms[k]()
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if i >= warmup:
                times[k].append((t1 - t0, t2 - t1))
            opt.step()
    return times


def phase_medians(times: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """``forward_ms_<form>`` and ``backward_ms_<form>``: medians of :func:`alternate_steps`'s
    times in milliseconds."""
    row = {}
    for k, v in times.items():
        row[f"forward_ms_{k}"] = round(statistics.median(t[0] for t in v) * 1e3, 2)
        row[f"backward_ms_{k}"] = round(statistics.median(t[1] for t in v) * 1e3, 2)
    return row


def paired_differences(times: dict[str, list[tuple[float, float]]], before: str,
                       after: str) -> dict[str, float]:
    """Median per-round ``before`` − ``after`` of :func:`alternate_steps`'s forward and backward
    times in milliseconds (a round's two steps share the machine's state, which a difference of
    medians does not cancel)."""
    row = {}
    for j, phase in enumerate(("forward", "backward")):
        d = [b[j] - a[j] for b, a in zip(times[before], times[after])]
        row[f"{phase}_saved_ms_paired"] = round(statistics.median(d) * 1e3, 3)
    return row
