"""The trained classifier's forward and backward as native kernels (:func:`fuse_linear`).

Not gradient filtering, and no method of the library applies it by default (a baseline would need
it too): an expert's CPU kernel for any model, vanilla included. A fine-tuned CNN's classifier is
a plain ``nn.Linear`` whose backward (``gx = g·W``, ``gW = gᵀ·x``, ``gb = Σ g``) is the same in
every method. With a small batch it is a sizeable part of a filtered step, because filtering has
removed most of the rest: on MobileNetV2 with its last 4 blocks trained, batch 16, its two GEMMs
take ~1.1 ms of a 4.8 ms fused backward. They run badly there (MKL, 70–80 GFLOP/s on a 2-core AMD
EPYC VM: ``gW``'s inner dimension is the batch, and ``gx`` re-packs the 5 MB weight), and they
read the weight and write its gradient in separate passes. The native kernel (``kernels.cpp``,
``linear_backward``) does both products in one pass over the weight, sharing the broadcasts of
``g``, at 150–180 GFLOP/s (AVX-512F, batch ≤ 64, float32; elsewhere the node runs ATen's products,
the same math). The forward ``y = x·Wᵀ + b`` has its own kernel there too (4 × 4 tiles of x's and
W's rows: 0.2 ms instead of MKL's 0.35 ms for that classifier at batch 16, warm).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native, traceable
from ._mixed import mixed_class
from .selection import Refusals, match

__all__ = ["FusedLinearMixin", "fuse_linear"]

class FusedLinearMixin:
    """Mixed in front of an ``nn.Linear`` by :func:`fuse_linear`: with gradients on, a float32
    CPU input and the native kernels built, the layer records one C++ autograd node whose
    backward is the one-pass kernel; otherwise (no-grad, autocast, another dtype or device,
    torch.compile / torch.export tracing) it is ``nn.Linear``'s own forward."""

    def forward(self, input: Tensor) -> Tensor:
        w = self.weight
        if (input.dtype is torch.float32 and w.dtype is torch.float32 and input.is_cpu
                and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not traceable.tracing() and native.available()):
            return torch.ops.gradfilter.linear(input, w, self.bias)
        return F.linear(input, w, self.bias)


def _why_not(module: nn.Module) -> str | None:
    """Why ``module`` cannot be fused (None: it can)."""
    if isinstance(module, FusedLinearMixin):
        return "already fused"
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear"
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} has its own forward"
    return None


def fuse_linear(model: nn.Module, names: str | Iterable[str],
                on_unsupported: str = "error") -> list[str]:
    """Run the named ``nn.Linear`` layers of ``model`` as the native kernels (module
    docstring); in place, returns the names fused. ``names``: layer names or glob
    patterns. A layer named exactly that cannot be fused (not a plain ``nn.Linear``, already
    fused) raises with the reason (``on_unsupported="error"``) or stays as it is (``"skip"``);
    layers matched by a glob only are fused where they can be. :func:`gradfilter.remove` undoes
    it; parameters, hooks and state-dict keys stay as they were."""
    refusals = Refusals("fuse_linear", "nn.Linear", names, on_unsupported)
    fused: list[str] = []
    for name, mod in model.named_modules():
        if not name or not match(name, refusals.patterns):
            continue
        why = _why_not(mod)
        if why is not None:
            refusals.refuse(name, why)
            continue
        mod._gradfilter_original_class = type(mod)
        mod.__class__ = mixed_class(FusedLinearMixin, type(mod), "Fused")
        fused.append(name)
    if not fused:
        raise refusals.nothing_fused()
    return fused
