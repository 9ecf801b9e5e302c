"""The fused block's math in PyTorch ops: its patch grids for one input size, the unit
statistics of the forward and the patch-resolution backward, as one autograd Function (the
reference path; :func:`gradfilter.native.fused_block` is the native one)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import geometry as GF
from .. import patches
from ..nn import tf_same_pad, tf_same_total
from .units import Unit

__all__ = [
    "FusedBlock", "Geometry", "Grid", "block_geometry", "bn_affine", "coarsen", "conv_forward",
    "patch_sums_cm", "per_pixel", "pooled_patch_means", "refine", "stride1_grid",
    "unit_backward", "unit_stats",
]


Grid = tuple[GF.AxisGeometry, GF.AxisGeometry]


def stride1_grid(h: int, w: int, radius: int) -> tuple[GF.AxisGeometry, GF.AxisGeometry]:
    """The stride-1 patch grid of an h×w map (output grid = input grid, docs/spec.md §2.1)."""
    return (GF.axis_geometry(h, h, 1, 1, 1, radius), GF.axis_geometry(w, w, 1, 1, 1, radius))


def patch_sums_cm(t: Tensor, gh: GF.AxisGeometry, gw: GF.AxisGeometry,
                   means: bool = False) -> Tensor:
    """Sums of t over the grid's patches (with ``means``: averages over each patch's real
    pixels), channel-major: (C, N·Ph·Pw)."""
    c = t.shape[1]
    sums = patches.patch_mean_output(t, gh, gw)[0].transpose(0, 1).reshape(c, -1)
    return sums / per_pixel((gh, gw), t.shape[0], t) if means else sums


def bn_affine(bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(scale γ/σ, shift β − μγ/σ, 1/σ) of an eval-mode BatchNorm."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps).to(dtype)
    mean = bn.running_mean.to(dtype)
    scale = inv_std if bn.weight is None else bn.weight * inv_std
    shift = -mean * scale if bn.bias is None else bn.bias - mean * scale
    return scale, shift, inv_std


def unit_stats(z: Tensor, scale: Tensor, shift: Tensor, upper: float, gh: GF.AxisGeometry,
                gw: GF.AxisGeometry) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mask count, masked sum of z, sum of y); the sums channel-major (C, N·P), the count
    in one byte each where a patch has at most 255 pixels (:func:`native.bn_act_stats` is the
    native path's one-pass form)."""
    small = gh.radius * gw.radius <= 255
    v = z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if math.isnan(upper):
        y, mask, masked_z = v, torch.ones_like(v), z
    else:
        y = v.clamp(0.0, upper)
        passed = (v > 0) & (v < upper)
        mask = passed.to(z.dtype)
        # where, not z * mask: an infinite z outside the mask must not turn the sum into NaN
        masked_z = torch.where(passed, z, 0.0)
    count = patch_sums_cm(mask, gh, gw)
    return (y, count.to(torch.uint8) if small else count, patch_sums_cm(masked_z, gh, gw),
            patch_sums_cm(y, gh, gw))


@dataclass(frozen=True)
class Geometry:
    """Patch grids of a fused block for one input size: the stride-1 grid at the input
    resolution, then per unit its output grid and, for a stride-2 unit, its conv's input padding
    (TF 'same' or symmetric) and whether its x̃ is the coarsened previous grid."""

    grid_in: Grid
    grids: tuple[Grid, ...]
    strided: tuple[bool, ...]


def block_geometry(units: list[Unit], h: int, w: int) -> Geometry | None:
    """The block's grids for an h×w input, or None where a stride-2 conv's input patches
    (2r×2r, docs/spec.md §2.2) are not unions of 2×2 patches of the grid before it."""
    radius = units[0].conv.radius
    cur = stride1_grid(h, w, radius)
    grid_in, grids, strided = cur, [], []
    for u in units:
        conv = u.conv
        if conv.stride == (1, 1):
            grids.append(cur)
            strided.append(False)
            continue
        sizes = (cur[0].size, cur[1].size)
        axes = []
        for d in range(2):
            k, size = conv.kernel_size[d], sizes[d]
            if conv.tf_same:  # the filtered conv sees the padded map (nn._FilteredMixin)
                total = tf_same_total(size, k, 2, 1)
                seen, before, out = size + total, total // 2, (size + total - k) // 2 + 1
            else:  # its grids are relative to the map itself
                seen, before, out = size, 0, (size + 2 * (k // 2) - k) // 2 + 1
            g_in = GF.axis_geometry(seen, out, k, 2, 1, radius)
            # the conv's input grid relative to the map must be the coarsened grid before it
            if g_in.in_pad + before != cur[d].out_pad or 2 * g_in.patches < cur[d].patches:
                return None
            axes.append(GF.axis_geometry(out, out, 1, 1, 1, radius))
        cur = (axes[0], axes[1])
        grids.append(cur)
        strided.append(True)
    return Geometry(grid_in, tuple(grids), tuple(strided))


def coarsen(t: Tensor, fine: Grid, coarse: Grid) -> Tensor:
    """(C, N·Pf) sums on a grid → (C, N·Pc) sums on the grid of 2×2 unions of its patches."""
    c = t.shape[0]
    ph, pw = coarse[0].patches, coarse[1].patches
    t = t.view(c, -1, fine[0].patches, fine[1].patches)
    t = F.pad(t, (0, 2 * pw - fine[1].patches, 0, 2 * ph - fine[0].patches))
    return t.view(c, -1, ph, 2, pw, 2).sum((3, 5)).reshape(c, -1)


def refine(t: Tensor, coarse: Grid, fine: Grid) -> Tensor:
    """Per-patch values on the coarse grid repeated onto the fine grid's patches (C, N·Pf)."""
    c = t.shape[0]
    t = t.view(c, -1, coarse[0].patches, coarse[1].patches)
    t = t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return t[:, :, :fine[0].patches, :fine[1].patches].reshape(c, -1)


def conv_forward(conv: nn.Conv2d, t: Tensor) -> Tensor:
    if conv.stride == (1, 1):
        pad = (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    elif conv.tf_same:
        t, pad = tf_same_pad(t, conv.kernel_size, conv.stride, conv.dilation), (0, 0)
    else:
        pad = conv.padding
    return F.conv2d(t, conv.weight, conv.bias, conv.stride, pad, 1, conv.groups)


def per_pixel(grid: Grid, n: int, like: Tensor) -> Tensor:
    """(1, N·P): the real pixels of each patch, repeated over the batch (cached, read-only)."""
    return _per_pixel_cached(grid[0], grid[1], n, like.device, like.dtype)


@functools.lru_cache(maxsize=256)
def _per_pixel_cached(gh: GF.AxisGeometry, gw: GF.AxisGeometry, n: int, device: torch.device,
                      dtype: torch.dtype) -> Tensor:
    counts = patches.inverse_counts(gh, gw, device, dtype).reciprocal()
    return counts.reshape(1, 1, -1).expand(1, n, -1).reshape(1, -1)


def unit_backward(g: Tensor, count: Tensor, mz: Tensor | None, scale: Tensor, inv_std: Tensor,
                   mean: Tensor, per_pixel: Tensor,
                   gscale: float) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """A unit's backward before its conv's products (PyTorch ops; :func:`native.unit_backward`
    is the one-pass form): (the conv's filtered output gradient ḡ, γ's grad Σ g·m·(z − μ)/σ
    (None without ``mz``), β's grad Σ g·m, the conv bias's grad), g one value per patch."""
    count = count.to(g.dtype)
    g_gamma = None
    if mz is not None:
        g_gamma = (g * (mz - mean.to(g.dtype)[:, None] * count)).sum(1) * inv_std
    g_count = g * count
    g_beta = g_count.sum(1)
    g_count = g_count * scale[:, None]  # Σ over each patch of the conv's output grad
    gbar = g_count / per_pixel
    if gscale != 1.0:
        gbar = gbar * gscale
    return gbar, g_gamma, g_beta, g_count.sum(1)


_PARAMS = 5  # FusedBlock's arguments before the units' parameters


class FusedBlock(torch.autograd.Function):
    """A fused block as one autograd node, in PyTorch ops (the reference path; the native path
    is :func:`native.fused_block`): ``pool`` returns the global average of its output (N, C)
    instead of the map (a block that feeds a global-average-pooling head; no skip)."""

    @staticmethod
    def forward(ctx, x: Tensor, units: list[Unit], skip: bool, geo: Geometry, pool: bool,
                *params: Tensor | None):
        n = x.shape[0]
        ctx.meta = (units, skip, geo, n, pool)
        ys = patch_sums_cm(x, *geo.grid_in)  # the first conv's x̃ (not coarsened)
        prev = geo.grid_in
        saved: list[Tensor | None] = []
        t = x
        for i, u in enumerate(units):
            xt = coarsen(ys, prev, geo.grids[i]) if geo.strided[i] else ys
            z = conv_forward(u.conv, t)
            scale, shift, inv_std = bn_affine(u.bn, z.dtype)
            t, count, mz, ys = unit_stats(z, scale, shift, u.upper, *geo.grids[i])
            prev = geo.grids[i]
            if not ctx.needs_input_grad[_PARAMS + 2 + 4 * i]:  # BatchNorm weight frozen:
                mz = None  # Σ m·z unused
            saved += [xt, count, mz, scale, inv_std, u.bn.running_mean, u.conv.weight]
        if skip:
            t = t + x
        ctx.save_for_backward(*saved)
        return t.mean((2, 3)) if pool else t

    @staticmethod
    def backward(ctx, g_out: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError("gradfilter: double backward through a fused block is not "
                               "supported")
        units, skip, geo, n, pool = ctx.meta
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if pool:  # the mean's gradient is g/(H·W) at every pixel: so are its patch means
            g_out = pooled_patch_means(g_out, geo.grids[-1])
        g = g_out.flatten(1) if pool else patch_sums_cm(g_out, *geo.grids[-1], means=True)
        grads: list[Tensor | None] = [None] * (4 * len(units))
        for i in reversed(range(len(units))):
            u, grid = units[i], geo.grids[i]
            pixels = per_pixel(grid, n, g)
            xt, count, mz, scale, inv_std, mean, weight = saved[7 * i: 7 * i + 7]
            need_w, need_b, need_gamma, need_beta = needs[_PARAMS + 4 * i: _PARAMS + 4 + 4 * i]
            gscale = 0.25 if geo.strided[i] else 1.0  # docs/spec.md §5: the stride scale
            gbar, g_gamma, g_beta, g_bias = unit_backward(
                g, count, mz if need_gamma else None, scale, inv_std, mean, pixels, gscale)
            grads[4 * i + 1: 4 * i + 4] = (g_bias if need_b else None,
                                           g_gamma if need_gamma else None,
                                           g_beta if need_beta else None)
            depthwise = u.conv.groups > 1
            if need_w:
                gw_ = (gbar * xt).sum(1)[:, None] if depthwise else gbar @ xt.t()
                grads[4 * i] = (gw_.view(weight.shape) if weight.shape[2:] == (1, 1) else
                                gw_[:, :, None, None].expand(weight.shape).contiguous())
            if i == 0 and not needs[0]:
                break
            # W̃ (a 1×1 kernel's is the weight itself)
            w_sum = weight.flatten(1) if weight.shape[2:] == (1, 1) else weight.sum((2, 3))
            g = w_sum * gbar if depthwise else w_sum.t() @ gbar  # g̃x, one value per patch
            if geo.strided[i]:
                g = refine(g, grid, geo.grids[i - 1] if i else geo.grid_in)
        gx = None
        if needs[0]:
            c, (gh, gw) = g.shape[0], geo.grid_in
            gxt = g.view(c, n, gh.patches, gw.patches).transpose(0, 1)
            gx = patches.unpool_input(gxt, gh, gw)
            if skip:
                gx = gx.add_(g_out)
        return (gx, None, None, None, None, *grads)


def pooled_patch_means(g: Tensor, grid: Grid) -> Tensor:
    """(C, N, P): the patch means of the gradient that a global average pooling hands back for
    g (N, C): g/(H·W) on every patch."""
    gh, gw = grid
    p = gh.patches * gw.patches
    return (g.t() / (gh.size * gw.size)).unsqueeze(-1).expand(-1, -1, p).contiguous()


def traced_units(x: Tensor, units: list[Unit], skip: bool, pool: bool) -> Tensor:
    """The fused node's values and gradients in plain differentiable ops, for torch.compile and
    torch.export, which cannot trace the node: each unit's filtered conv (its module, which
    traces its stop-gradient form), eval BatchNorm with its exact gradients and the
    activation. Where the gradient arriving at the block is patch-constant (between fused blocks,
    from a pooled head), these are the fused node's gradients (docs/spec.md §10)."""
    t = x
    for u in units:
        bn = u.bn
        t = F.batch_norm(u.conv(t), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         False, 0.0, bn.eps)
        if math.isinf(u.upper):
            t = torch.relu(t)
        elif not math.isnan(u.upper):
            t = t.clamp(0.0, u.upper)
    if skip:
        t = t + x
    return t.mean((2, 3)) if pool else t
