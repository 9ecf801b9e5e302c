"""Where the filtered conv's GPU time goes on one small and one big per-layer config: the
PyTorch profiler's table (CPU-side dispatch vs kernels). Run on a GPU machine:

    PYTHONPATH=src python3 benchmarks/reproduce/gpu_profile.py > benchmarks/results/gpu/profile.txt
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import gradfilter.functional as GF


def main() -> None:
    dev = torch.device("cuda")
    for c, h, w, r in [(256, 14, 14, 2), (128, 120, 160, 4)]:
        x = torch.randn(32, c, h, w, device=dev, requires_grad=True)
        weight = torch.randn(c, c, 3, 3, device=dev, requires_grad=True)
        gy = torch.randn(32, c, h, w, device=dev)
        for _ in range(5):
            torch.autograd.grad(GF.conv2d(x, weight, None, 1, 1, radius=r), (x, weight), gy)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                y = GF.conv2d(x, weight, None, 1, 1, radius=r)
                torch.autograd.grad(y, (x, weight), gy)
            torch.cuda.synchronize()
        print(f"=== C={c} {h}x{w} r={r}, batch 32, 10 forward+backward ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=10))


if __name__ == "__main__":
    main()
