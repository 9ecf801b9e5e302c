"""Describe the machine a benchmark ran on, so every number carries its context."""

from __future__ import annotations

import os
import platform

import torch

from .. import native
from ..allocator import allocator_tuned


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_id() -> dict:
    """CPU family / model numbers and AVX-512 support from /proc/cpuinfo (empty elsewhere): a VM's
    "model name" can hide the host generation, which moves dense-conv throughput 2x (Zen 4 runs
    AVX-512 at half the width Zen 5 does)."""
    fields: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                elif key == "flags":
                    fields["avx512"] = "avx512f" in value.split()
                    break
    except OSError:
        return {}
    out: dict = {}
    if "cpu family" in fields and "model" in fields:
        out["cpu_id"] = f"family {fields['cpu family']} model {fields['model']}"
    if "avx512" in fields:
        out["avx512"] = fields["avx512"]
    return out


def machine_info(device: str = "cpu") -> dict:
    info = {
        "cpu": _cpu_model(),
        **_cpu_id(),
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
