"""Memory-lean ReLU/ReLU6 and eval-mode BatchNorm (docs/spec.md §9, whole-block memory).

Once the convolutions of a block keep only their patch-summed inputs, the activations and
BatchNorm layers between them keep most of what autograd saves: PyTorch's ReLU saves its full
output, eval-mode BatchNorm its full input. Here:

* ``relu`` / ``relu6`` save the gradient mask as bits (1/32 of float32), and their gradient is
  exactly PyTorch's (``x > 0`` for ReLU, ``0 < x < 6`` for ReLU6);
* ``batch_norm_eval`` is BatchNorm with running statistics, ``y = (x - mean) / sqrt(var + eps)
  * weight + bias``. Its input gradient ``g * weight / sqrt(var + eps)`` and bias gradient
  ``sum g`` need no saved activation. The weight gradient ``sum g * (x - mean) / sqrt(var +
  eps)`` needs x; with ``radius=None`` x is saved whole (exact), with ``radius=r`` only its sums
  over r x r patches (anchored at the top-left, the last patch of an axis may be smaller) and

      sum g * x  ~  sum over patches P of  (sum_P g) * (sum_P x) / |P|

  the same approximation the filtered convolution makes for its weight gradient (exact when g
  or x is constant on each patch); with a frozen weight nothing is saved at all.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native, patches, traceable

__all__ = ["batch_norm_eval", "pack_bits", "patch_sums", "relu", "relu6", "unpack_bits"]

# Multiplying a little-endian int64 holding eight 0/1 bytes by _GATHER moves byte i's bit to bit
# 56 + i with no carries (the partial products land on distinct bits), so ">> 56" is the packed
# byte. Multiplying a byte by _SPREAD copies it to all eight bytes; "& _SELECT" keeps bit i of
# byte i.
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as a flat uint8 tensor of ``ceil(numel / 8)`` bytes, 8 elements a byte."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape``."""
    words = (packed.to(torch.int64) * _SPREAD) & _SELECT
    numel = 1
    for s in shape:
        numel *= s
    return (words.view(torch.uint8) != 0)[:numel].view(shape)


class _MaskedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, upper: float | None) -> Tensor:
        ctx.shape = x.shape
        # native: one pass for the clamp and the mask, in memory order (channels-last included)
        ctx.native_format = patches.dense_format(x) if native.applies(x) else None
        if ctx.native_format is not None:
            y, packed = native.masked_clamp(x, math.inf if upper is None else upper)
            ctx.save_for_backward(packed)
            return y
        if upper is None:
            y = torch.relu(x)
            mask = y > 0
        else:
            y = torch.clamp(x, 0.0, upper)
            mask = (x > 0) & (x < upper)
        ctx.save_for_backward(pack_bits(mask))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (packed,) = ctx.saved_tensors
        if ctx.native_format is not None:  # the mask is in x's memory order: match it
            return native.mask_apply(grad.contiguous(memory_format=ctx.native_format), packed), None
        mask = unpack_bits(packed, ctx.shape)
        return grad.masked_fill(~mask, 0), None


def relu(x: Tensor) -> Tensor:
    """``torch.relu`` whose backward keeps one bit per element (plain ``torch.relu`` while
    torch.compile/export traces: same gradient, the mask is the compiler's business)."""
    if not (torch.is_grad_enabled() and x.requires_grad) or traceable.tracing():
        return torch.relu(x)
    return _MaskedActivation.apply(x, None)


def relu6(x: Tensor) -> Tensor:
    """``F.relu6`` whose backward keeps one bit per element (plain ``F.relu6`` while traced)."""
    if not (torch.is_grad_enabled() and x.requires_grad) or traceable.tracing():
        return F.relu6(x)
    return _MaskedActivation.apply(x, 6.0)


def patch_sums(x: Tensor, radius: int) -> Tensor:
    """Sums of ``x`` (``N, C, H[, W]``) over ``radius``-wide patches of each spatial axis,
    anchored at index 0; an axis not divisible by ``radius`` ends with a smaller patch."""
    spatial = x.shape[2:]
    if len(spatial) == 2:  # one pass (tiny-map GEMM or native kernel), ragged patches included
        h, w = spatial
        fast = patches.fast_patch_sum(x, radius, radius, 0, 0, -(-h // radius), -(-w // radius))
        if fast is not None:
            return fast
    pads: list[int] = []
    for size in reversed(spatial):
        pads += [0, (-size) % radius]
    if any(pads):
        x = F.pad(x, pads)
    if len(spatial) == 1:
        return x.reshape(*x.shape[:2], -1, radius).sum(3)
    return patches.sum_exact(x, radius, radius)  # the conv's patch pooling (CPU- and GPU-tuned)


def _patch_counts(spatial: torch.Size, radius: int, like: Tensor) -> Tensor:
    return _cached_patch_counts(tuple(spatial), radius, like.dtype, like.device)


@functools.lru_cache(maxsize=128)
def _cached_patch_counts(spatial: tuple[int, ...], radius: int, dtype: torch.dtype,
                         device: torch.device) -> Tensor:
    """Pixels per patch (read-only, cached per shape)."""
    ones = torch.ones((1, 1, *spatial), dtype=dtype, device=device)
    return patch_sums(ones, radius)


class _BatchNormEval(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, radius):
        # PyTorch's own eval-mode kernel: one pass, bit-identical to nn.BatchNorm in eval
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        inv_std = torch.rsqrt(var + eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = inv_std if weight is None else weight * inv_std
        ctx.weight_grad = weight is not None and ctx.needs_input_grad[3]
        ctx.radius = radius
        ctx.shape = shape
        ctx.spatial = x.shape[2:]
        if ctx.weight_grad:
            saved = x if radius is None else patch_sums(x, radius)
            ctx.save_for_backward(saved, mean, inv_std, scale)
        else:
            ctx.save_for_backward(scale)
        return y

    @staticmethod
    def backward(ctx, g):
        if ctx.weight_grad:
            saved, mean, inv_std, scale = ctx.saved_tensors
        else:
            (scale,) = ctx.saved_tensors
        dims = [0, *range(2, g.dim())]
        gx = g * scale.view(ctx.shape) if ctx.needs_input_grad[0] else None
        gw = sum_g = None
        if ctx.weight_grad:
            if ctx.radius is None:
                sum_g, sum_gx = g.sum(dims), (g * saved).sum(dims)
            else:  # g is read once: its patch sums give both sums
                g_sums = patch_sums(g, ctx.radius)
                counts = _patch_counts(ctx.spatial, ctx.radius, g)
                sum_g, sum_gx = g_sums.sum(dims), (g_sums * saved / counts).sum(dims)
            gw = (sum_gx - mean * sum_g) * inv_std
        if ctx.needs_input_grad[4]:
            gb = sum_g if sum_g is not None else g.sum(dims)
        else:
            gb = None
        return gx, None, None, gw, gb, None, None


def batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor,
                    weight: Tensor | None, bias: Tensor | None, eps: float,
                    radius: int | None = None) -> Tensor:
    """Eval-mode BatchNorm (running statistics) that saves only what its gradients need: nothing
    for the input and bias, x (``radius=None``) or x's patch sums (``radius=r``) for a weight
    that requires grad. The forward is ``F.batch_norm(..., training=False)`` itself. While
    torch.compile/export traces, :func:`gradfilter.traceable.batch_norm_eval` (same output and
    gradients, plain ATen ops) runs instead."""
    if radius is not None and (not isinstance(radius, int) or radius < 1):
        raise ValueError(f"radius must be None or an int >= 1, got {radius!r}")
    if x.dim() < 3:
        raise ValueError(f"batch_norm_eval needs (N, C, *spatial) input, got {tuple(x.shape)}")
    if traceable.tracing():
        return traceable.batch_norm_eval(x, running_mean, running_var, weight, bias, eps, radius)
    needs = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    return _BatchNormEval.apply(x, running_mean, running_var, weight, bias, eps, radius)
