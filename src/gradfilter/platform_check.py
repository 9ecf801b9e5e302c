"""Known-bad platform combinations, found before the user meets them as a crash.

Recent aarch64 torch wheels on PyPI (2.14.1 among them) are CUDA builds whose CPU BLAS (NVPL)
uses ARMv8.1 atomic instructions: on an ARMv8.0 core (Raspberry Pi 4's Cortex-A72) a
multi-threaded matrix multiply dies with SIGILL. The CPU wheels (torch 2.9.1 / torchvision
0.24.1) run there.
"""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["platform_warnings"]

_REMEDY = ("install the CPU wheels instead: pip install torch==2.9.1 torchvision==0.24.1 "
           "(see the README's install section)")


def _arm_features(cpuinfo: Path) -> set[str] | None:
    """The CPU feature flags the kernel lists for an ARM core (None where it lists none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Features":
            return set(value.split())
    return None


def platform_warnings(machine: str | None = None, cuda_build: bool | None = None,
                      cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """One line per known-bad combination on this machine (empty: none). The arguments default
    to this machine and this torch; tests pass others."""
    if machine is None:
        machine = platform.machine()
    if machine not in ("aarch64", "arm64"):
        return []
    if cuda_build is None:
        import torch

        cuda_build = torch.version.cuda is not None
    features = _arm_features(cpuinfo)
    if cuda_build and features is not None and "atomics" not in features:
        return ["this torch is a CUDA build for aarch64, whose CPU math library needs ARMv8.1 "
                "atomics that this core (ARMv8.0, e.g. a Raspberry Pi 4) lacks: training will "
                f"crash with SIGILL; {_REMEDY}"]
    return []
