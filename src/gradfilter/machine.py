"""Describe the machine a benchmark ran on, so every number carries its context."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Iterator

import torch

from . import native
from .allocator import allocator_tuned


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu(fields: dict[str, str]) -> dict:
    """Model name, and the family / model numbers and AVX-512 support where /proc/cpuinfo has
    them: a VM's "model name" can hide the host generation, which moves dense-conv throughput 2x
    (Zen 4 runs AVX-512 at half the width Zen 5 does)."""
    out: dict = {"cpu": fields.get("model name") or platform.processor() or platform.machine()}
    if "cpu family" in fields and "model" in fields:
        out["cpu_id"] = f"family {fields['cpu family']} model {fields['model']}"
    if "flags" in fields:
        out["avx512"] = "avx512f" in fields["flags"].split()
    return out


def machine_info(device: str = "cpu") -> dict:
    info = {
        **_cpu(_cpuinfo()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "allocator": "tuned (glibc M_MMAP_MAX=0)" if allocator_tuned() else "default",
    }
    if device == "cpu":
        info["native_kernels"] = native.available()
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def cross_core_read_ratio(mib: int = 8, repeats: int = 15) -> float | None:
    """How much longer one thread takes to read a buffer that all intra-op threads just wrote
    than one it wrote itself (median over ``repeats``); None with a single thread.

    About 1 where the threads' cores share a cache. On this project's 2-vCPU VM it reads about 2
    at times, for minutes (the host places the vCPUs on cores that do not share one): a pass
    over data another thread just wrote then pays for the transfer, and fused training steps'
    backward and optimizer step run slower (docs/performance.md). Benchmarks record it so that
    such runs can be told apart."""
    threads = torch.get_num_threads()
    if threads < 2:
        return None
    n = mib * 2**20 // 4
    src, buf = torch.ones(n), torch.empty(n)
    times: dict[int, list[float]] = {threads: [], 1: []}
    try:
        for _ in range(repeats):
            for writers in (threads, 1):
                torch.set_num_threads(writers)
                torch.mul(src, 2.0, out=buf)  # each thread writes its own share
                torch.set_num_threads(1)
                t0 = time.perf_counter()
                buf.sum()
                times[writers].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times[threads]) / statistics.median(times[1])


def describe(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    alloc = f", allocator {info['allocator']}" if "allocator" in info else ""
    kernels = ("" if "native_kernels" not in info else
               ", native kernels" if info["native_kernels"] else ", pure-PyTorch kernels")
    ident = []
    if "cpu_id" in info:
        ident.append(info["cpu_id"])
    if info.get("avx512"):
        ident.append("AVX-512")
    cpu = f"{info['cpu']} [{', '.join(ident)}]" if ident else info["cpu"]
    return (f"{cpu} ({info['torch_threads']} torch threads){gpu}, torch "
            f"{info['torch']}{alloc}{kernels}")


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on the CPU. Timers call it first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def cpu_load(processes: int) -> Iterator[None]:
    """``processes`` CPU-bound processes spinning while the block runs (another job on the
    device's cores), stopped when it ends: the condition a benchmark's speed-ups must survive."""
    if processes < 0:
        raise ValueError(f"load processes must be >= 0, got {processes}")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spin, daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join()
