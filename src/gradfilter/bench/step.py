"""End-to-end benchmark: one training step of a real model, vanilla vs gradient filtering.

For each model and "last N blocks" setting, four copies of the model are prepared as a user
would (:func:`gradfilter.train.prepare_model`: last N blocks + classifier train, BatchNorm in
eval mode):

* ``vanilla``   plain backprop;
* ``filtered``  the convolutions of the trainable blocks filtered at radius r (what the paper's
  reference code does);
* ``lean``      filtered convolutions plus :func:`gradfilter.slim` (ReLU masks as bits,
  BatchNorm weight gradient from patch sums at radius r);
* ``fused``     ``lean`` plus :func:`gradfilter.fuse_blocks` on the trainable blocks it
  supports (inverted residuals and conv-BN-act blocks: the whole block's backward at patch
  resolution); the others stay ``lean`` (all of ResNet18's: its BasicBlock ends in a ReLU
  after the skip sum). The classifier is ``nn.Linear`` in every method.

One step is forward + cross-entropy + backward + SGD step; every method's optimizer carries
:class:`gradfilter.optim.FlushBeforeStep` (as the trainer's does), whose choice is recorded
(``flush``). The methods' steps alternate in one
process; each figure is the median of ``repeats`` steps.

With ``compile``, each method also runs compiled (``model.compile()``, inductor: keys
``<method>_compiled``; the filtered layers trace their stop-gradient form,
:mod:`gradfilter.traceable`), alternating with the eager ones, and the forward-only time is taken
compiled too (``forward_only_compiled``). A compiled method's E is taken against the compiled
vanilla step and the compiled forward-only time: the baseline a user who compiles would pick.

The forward-only time (no grad) bounds
what any backward trick can reach; the efficiency ``E = (T_vanilla - T_method) / (T_vanilla -
T_forward_only)`` is the share of that bound reached, from the medians; ``efficiency_paired``
is the median of the same ratio taken round by round (each round times every method back to
back, so load that changes between rounds cancels), with its interquartile range
(``efficiency_iqr``) as the run's spread. ``efficiency_bound`` is the E of a method
with vanilla's forward and optimizer step and a backward of zero time: the most any backward
trick can reach. Saved bytes are what autograd keeps for
backward (``saved_tensors_hooks``, parameters excluded), in total and within the trainable
blocks; peak memory is ``torch.cuda.max_memory_allocated`` on GPU and the growth of the
process's peak RSS over one step in a fresh process on CPU.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..machine import (
    cpu_load,
    cross_core_read_ratio,
    describe,
    machine_info,
    synchronize,
)
from ..optim import flush_before_step, fused_kwargs
from ..train.trainer import METHODS
from . import save_result

MODELS = ("mobilenet_v2", "resnet18", "tf_efficientnet_lite0")
COMPILED = "_compiled"  # suffix of a compiled variant's keys
LAST = (4, 8)
# cross_core_read_ratio above which a case ran with its threads on cores without a shared cache
SPLIT_CACHE_RATIO = 1.3
# Each benchmark optimizer's parameter flush (gradfilter.optim.FlushBeforeStep, attached in
# build): its choice goes into the results
FLUSH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def build(model_name: str, method: str, last: int, radius: int, example: torch.Tensor):
    """A model set up for ``method`` as a user would (:func:`gradfilter.train.prepare_model`);
    returns (model, optimizer, trainable block names)."""
    from ..models import create_model
    from ..train import prepare_model

    torch.manual_seed(0)
    net = create_model(model_name, 1000)
    net, info = prepare_model(net, method, radius, last, example)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, **fused_kwargs(params))
    FLUSH[opt] = flush_before_step(opt)  # every method, as the trainer does
    return net, opt, info.blocks


def paired_efficiency(vanilla: list[float], method: list[float],
                      forward_only: list[float]) -> tuple[float, float, float] | None:
    """Per-round E = (v − m) / (v − f) over the rounds whose window v − f is positive: (median,
    lower quartile, upper quartile), or None when there is none. A machine that slows down
    between rounds moves all three times of a round alike, which cancels here and not in a ratio
    of per-method medians."""
    es = [(v - m) / (v - f) for v, m, f in zip(vanilla, method, forward_only) if v - f > 0]
    if not es:
        return None
    q = statistics.quantiles(es, n=4, method="inclusive") if len(es) > 1 else [es[0]] * 3
    return statistics.median(es), q[0], q[2]


def _step(net, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def _timed_step(net, opt, x, y, device: torch.device) -> tuple[float, float, float]:
    """One step as :func:`_step`; seconds spent in (forward + loss, backward, optimizer)."""
    opt.zero_grad(set_to_none=True)
    synchronize(device)
    t0 = time.perf_counter()
    loss = F.cross_entropy(net(x), y)
    synchronize(device)
    t1 = time.perf_counter()
    loss.backward()
    synchronize(device)
    t2 = time.perf_counter()
    opt.step()
    synchronize(device)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def variants(compile: bool | str, methods: tuple[str, ...] = METHODS) -> tuple[str, ...]:
    """The timed variants: every method eager, and with ``compile`` every method compiled."""
    return (*methods, *(f"{m}{COMPILED}" for m in methods)) if compile else tuple(methods)


def check_methods(methods) -> tuple[str, ...]:
    """``methods`` in :data:`METHODS` order, vanilla (the baseline) always first."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(METHODS)}")
    return tuple(m for m in METHODS if m == "vanilla" or m in methods)


def _baseline(variant: str) -> tuple[str, str]:
    """The (vanilla, forward-only) keys a variant's speed-up and E are taken against."""
    if variant.endswith(COMPILED):
        return f"vanilla{COMPILED}", f"forward_only{COMPILED}"
    return "vanilla", "forward_only"


def bench_case(model_name: str, last: int, radius: int, batch: int, size: int, repeats: int,
               device: torch.device, channels_last: bool = False,
               compile: bool | str = False, compile_mode: str | None = None,
               methods=METHODS) -> dict[str, Any]:
    """One model and "last N" setting: every variant's step, alternating (module docstring).
    ``compile``: also the compiled variants (``True``: inductor; a string names the backend),
    compiled with ``compile_mode`` (e.g. ``"reduce-overhead"``: CUDA graphs on a GPU)."""
    methods = check_methods(methods)
    from ..memory import count_saved

    fmt = _memory_format(channels_last)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    nets = {}
    for v in variants(compile, methods):
        m = v.removesuffix(COMPILED)
        net, opt, blocks = build(model_name, m, last, radius, x[:2].cpu())
        net = net.to(device, memory_format=fmt).train()
        if v != m:
            net.compile(backend="inductor" if compile is True else compile, mode=compile_mode)
        nets[v] = (net, opt)
    row: dict[str, Any] = {"model": model_name, "last": last, "radius": radius, "batch": batch,
                           "image_size": size, "blocks": blocks, "channels_last": channels_last,
                           "threads": torch.get_num_threads(), "methods": list(methods),
                           "compile_mode": compile_mode}
    for m in methods:  # what autograd saves: eager modules (inductor saves its own choice)
        net = nets[m][0]
        with count_saved(net.parameters(), model=net) as saved:
            F.cross_entropy(net(x), y)
        row[f"saved_bytes_{m}"] = saved.bytes
        row[f"saved_bytes_blocks_{m}"] = saved.bytes_under(blocks)
    # the VM state that slows a pass over data the other core just wrote (machine.py): before
    # and after the timed rounds
    split_before = cross_core_read_ratio() if device.type == "cpu" else None
    timed = variants(compile, methods)
    forward_keys = ("forward_only", *((f"forward_only{COMPILED}",) if compile else ()))
    row["compile"] = compile
    times: dict[str, list[float]] = {k: [] for k in (*timed, *forward_keys)}
    phases: dict[str, list[tuple[float, float, float]]] = {m: [] for m in timed}
    # two warm-up rounds are dropped (compilation and its recompilations happen there), after
    # the optimizers' flush choice has settled
    warmup = 2 + max(FLUSH[opt].settle_steps for _, opt in nets.values())
    for i in range(repeats + warmup):
        order = list(timed) if i % 2 == 0 else list(reversed(timed))
        for m in order:
            net, opt = nets[m]
            parts = _timed_step(net, opt, x, y, device)
            if i >= warmup:
                times[m].append(sum(parts))
                phases[m].append(parts)
        for key in forward_keys:
            net = nets[key.replace("forward_only", "vanilla")][0]
            synchronize(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                net(x)
            synchronize(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    if split_before is not None:  # None: one thread, or a GPU case
        row["cross_core_read_ratio"] = [round(split_before, 2),
                                        round(cross_core_read_ratio(), 2)]
    for key in forward_keys:
        row[f"{key}_ms"] = med[key]
    # whether each method's optimizer flushed its parameters before its steps (auto's choice)
    row["flush"] = {m: FLUSH[opt].flushing for m, (_, opt) in nets.items()}
    # how many probes each made (1 = only the warm-up's; more: its steps drifted mid-case)
    row["flush_probes"] = {m: FLUSH[opt].probes for m, (_, opt) in nets.items()}
    for m in timed:
        for k, phase in enumerate(("forward", "backward", "optimizer")):
            row[f"{phase}_ms_{m}"] = statistics.median(p[k] for p in phases[m]) * 1e3
    # The most E any method can reach that keeps vanilla's forward (autograd recording
    # included) and optimizer step: E with a backward of zero time.
    for van in (v for v in timed if v.removesuffix(COMPILED) == "vanilla"):
        fwd = _baseline(van)[1]
        bound = med[van] - med[fwd]
        no_backward = row[f"forward_ms_{van}"] + row[f"optimizer_ms_{van}"]
        suffix = van.removeprefix("vanilla")
        row[f"efficiency_bound{suffix}"] = ((med[van] - no_backward) / bound if bound > 0
                                            else None)
    for m in timed:
        row[f"step_ms_{m}"] = med[m]
        van, fwd = _baseline(m)
        if m == van:
            continue
        bound = med[van] - med[fwd]
        row[f"speedup_{m}"] = med[van] / med[m]
        row[f"efficiency_{m}"] = (med[van] - med[m]) / bound if bound > 0 else None
        paired = paired_efficiency(times[van], times[m], times[fwd])
        row[f"efficiency_paired_{m}"] = None if paired is None else paired[0]
        row[f"efficiency_iqr_{m}"] = None if paired is None else [paired[1], paired[2]]
        eager = m.removesuffix(COMPILED)
        if m != eager:  # the compiled method against its eager (native) path
            row[f"vs_eager_{m}"] = med[eager] / med[m]
        else:
            row[f"saved_ratio_blocks_{m}"] = (row["saved_bytes_blocks_vanilla"]
                                              / max(row[f"saved_bytes_blocks_{m}"], 1))
    if device.type == "cuda":
        # NVML's counter moves in coarse steps: give each method about two seconds of steps
        steps = max(10, int(2000 / max(min(med[m] for m in methods), 0.1)))
        row.update(_energy_per_step(nets, x, y, device, steps=steps))
        for m, (net, opt) in nets.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _step(net, opt, x, y)
            synchronize(device)
            row[f"peak_step_bytes_{m}"] = torch.cuda.max_memory_allocated(device) - base
    return row


def _energy_per_step(nets, x, y, device: torch.device, steps: int) -> dict[str, float]:
    """GPU energy per training step in joules (NVML's total-energy counter over ``steps``
    back-to-back steps per method); empty where NVML is missing."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        out = {}
        for m, (net, opt) in nets.items():
            synchronize(device)
            e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            for _ in range(steps):
                _step(net, opt, x, y)
            synchronize(device)
            out[f"energy_j_{m}"] = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - e0) \
                / 1e3 / steps
        return out
    except pynvml.NVMLError as exc:
        return {"energy_error": str(exc)}


def _peak_rss_worker(model_name, method, last, radius, batch, size, threads,
                     channels_last=False) -> int:
    """Growth of this (fresh) process's peak RSS over one training step, in bytes."""
    torch.set_num_threads(threads)
    fmt = _memory_format(channels_last)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    net, opt, _ = build(model_name, method, last, radius, x[:2])
    net.to(memory_format=fmt).train()
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        net(x)  # the forward's own transient peak is in the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(net, opt, x, y)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def _case_in_worker(args) -> dict[str, Any]:
    *case, device, threads, options = args
    torch.set_num_threads(threads)
    return bench_case(*case, torch.device(device), **options)


def run_step_bench(models=MODELS, lasts=LAST, radius: int = 4, batch: int | None = None,
                   size: int = 224, repeats: int = 7, device: str = "cpu",
                   out: str | None = None, quiet: bool = False,
                   channels_last: bool = False, compile: bool | str = False,
                   compile_mode: str | None = None, methods=METHODS,
                   threads: int | None = None, load: int = 0) -> dict[str, Any]:
    """Run :func:`bench_case` for every model and ``lasts`` setting (on CPU each case in a fresh
    process with ``threads`` threads, default: this process's), print a line per case, write
    JSON + PNG to ``out``. ``load``: that many CPU-bound processes spin beside the benchmark
    (:func:`gradfilter.machine.cpu_load`), as another job on a device would."""
    dev = torch.device(device)
    batch = batch or (32 if dev.type == "cuda" else 16)
    threads = threads or torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = {"channels_last": channels_last, "compile": compile,
               "compile_mode": compile_mode, "methods": check_methods(methods)}
    rows = []
    ctx = multiprocessing.get_context("spawn")
    with cpu_load(load):
        for model_name in models:
            for last in lasts:
                row = _run_case(ctx, (model_name, last, radius, batch, size, repeats), dev,
                                threads, options)
                rows.append(row)
                if not quiet:
                    print(_line(row), flush=True)
    result = {"machine": machine_info(device), "radius": radius, "batch": batch,
              "image_size": size, "repeats": repeats, "channels_last": channels_last,
              "compile": compile, "compile_mode": compile_mode,
              "methods": list(options["methods"]), "threads": threads,
              "load_processes": load, "rows": rows}
    if not quiet:
        print(f"machine: {describe(result['machine'])}; {threads} threads"
              + (f", {load} CPU-bound process(es) beside it" if load else ""))
    if out:
        save_result(result, out, plot)
    return result


def _run_case(ctx, case: tuple, dev: torch.device, threads: int,
              options: dict[str, Any]) -> dict[str, Any]:
    """One case: in this process on a GPU; on CPU in a fresh process, and each method's peak
    RSS growth in a fresh process of its own."""
    if dev.type == "cuda":
        return bench_case(*case, dev, **options)
    with ctx.Pool(1) as pool:
        row = pool.apply(_case_in_worker, ((*case, dev.type, threads, options),))
    model_name, last, radius, batch, size, _ = case
    for m in options["methods"]:
        with ctx.Pool(1) as pool:
            row[f"peak_step_bytes_{m}"] = pool.apply(
                _peak_rss_worker, (model_name, m, last, radius, batch, size, threads,
                                   options["channels_last"]))
    return row



def _line(row: dict[str, Any]) -> str:
    bound = row["efficiency_bound"]
    parts = [f"{row['model']:<22} last {row['last']}: fwd-only {row['forward_only_ms']:7.1f} ms"
             f" | vanilla {row['step_ms_vanilla']:7.1f} ms"
             f" (E bound {'-' if bound is None else f'{100 * bound:.0f}%'})"]
    ratio = max(row.get("cross_core_read_ratio") or [1.0])
    if ratio > SPLIT_CACHE_RATIO:
        parts[0] += f" [threads on split caches: cross-core reads {ratio:.1f}x]"
    flushed = [m for m, on in (row.get("flush") or {}).items() if on]
    if flushed:
        parts[0] += f" [parameters flushed before the step: {', '.join(flushed)}]"
    compiled = bool(row.get("compile"))
    methods = tuple(row.get("methods", METHODS))
    if compiled:
        parts.append(f"compiled: fwd-only {row[f'forward_only{COMPILED}_ms']:7.1f} ms, vanilla "
                     f"{row[f'step_ms_vanilla{COMPILED}']:7.1f} ms")
    for m in variants(compiled, methods):
        if f"speedup_{m}" not in row:
            continue
        eff, paired = row[f"efficiency_{m}"], row.get(f"efficiency_paired_{m}")
        e = "E -" if eff is None else f"E {100 * eff:.0f}%"
        if paired is not None:
            lo, hi = row[f"efficiency_iqr_{m}"]
            e += f" [paired {100 * paired:.0f}%, IQR {100 * lo:.0f}-{100 * hi:.0f}%]"
        extra = (f"{row[f'vs_eager_{m}']:.2f}x its eager path" if m.endswith(COMPILED) else
                 f"saved in blocks {row[f'saved_ratio_blocks_{m}']:.1f}x less")
        parts.append(f"{m} {row[f'step_ms_{m}']:7.1f} ms ({row[f'speedup_{m}']:.2f}x, {e}, "
                     f"{extra})")
    return " | ".join(parts)


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['model']}\nlast {r['last']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    xs = range(len(rows))
    compiled = bool(result.get("compile"))
    methods = tuple(result.get("methods", METHODS))
    bars = ("forward_only", *(("forward_only" + COMPILED,) if compiled else ()),
            *variants(compiled, methods))
    width = 0.8 / len(bars)
    for k, m in enumerate(bars):
        key = f"{m}_ms" if m.startswith("forward_only") else f"step_ms_{m}"
        axes[0].bar([x + (k - (len(bars) - 1) / 2) * width for x in xs], [r[key] for r in rows],
                    width,
                    label=m.replace("_", " "))
    axes[0].set_ylabel("ms per training step (median)")
    axes[0].set_xticks(list(xs), labels, fontsize=7)
    axes[0].legend()
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        axes[1].bar([x + (k - (len(methods) - 1) / 2) * width for x in xs],
                    [r[f"saved_bytes_blocks_{m}"] / 2**20 for r in rows], width, label=m)
    axes[1].set_ylabel("MiB saved for backward in the trainable blocks")
    axes[1].set_xticks(list(xs), labels, fontsize=7)
    axes[1].legend()
    load = result.get("load_processes") or 0
    fig.suptitle(f"one training step, batch {result['batch']}, {result['image_size']}², "
                 f"r={result['radius']}, {result.get('threads', '?')} threads"
                 + (f", {load} CPU-bound process(es) beside it" if load else "")
                 + f" — {describe(result['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
