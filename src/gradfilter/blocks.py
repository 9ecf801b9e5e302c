"""Block-level gradient filtering: a whole inverted-residual block's backward at patch resolution.

Inside a block of filtered convolutions (MobileNetV2 / EfficientNet-Lite ``InvertedResidual``:
1×1 conv, BatchNorm, ReLU6, depthwise conv, BatchNorm, ReLU6, 1×1 conv, BatchNorm, skip), the
gradient leaving a filtered conv is constant on each r×r patch (docs/spec.md §4.4). The eval-mode
BatchNorm and ReLU/ReLU6 between the convs are per-pixel masks and per-channel affines, and the
next conv only needs the patch *means* of what they produce. With ``g`` one value per patch:

* ReLU/ReLU6 then BatchNorm then the conv's patch mean: ``mean_P(g · m · s) = g · s · |m|_P / |P|``
  (``m`` the activation's pass mask, ``|m|_P`` its count in the patch, ``s = γ/σ``);
* BatchNorm's weight gradient ``Σ g · m · x̂ = Σ_P g_P · (Σ_P m·z − μ |m|_P) / σ`` (``z`` its
  input), its bias gradient ``Σ_P g_P · |m|_P``; the conv's bias gradient likewise.

So the forward keeps, per unit (conv → BatchNorm → activation), three patch-resolution maps: the
mask count, the masked sum of ``z`` and the sum of the activation output (the next conv's x̃);
the backward never touches a full-resolution map except to pool the gradient arriving at the
block and to write the one it passes down. The results are the per-layer filtered convolutions'
with exact BatchNorm and ReLU gradients whenever the gradient arriving at the block is constant
on its patches — as it is between such blocks and from a global-average-pooling head. Otherwise
the block works with that gradient's patch means from its last unit on: where the last unit has
no activation (an inverted residual) only its BatchNorm's weight gradient differs (as with
``slim(bn="patch")``); where it has one (``Conv2dNormActivation``) its mask meets the patch means
instead of the pixels, so all the block's gradients differ. The skip passes the gradient on exactly.

Supported blocks: torchvision ``InvertedResidual`` and ``Conv2dNormActivation``, timm
``InvertedResidual`` (no squeeze-excite, no drop-path), whose convs are all filtered with one
radius, dilation 1, odd kernels, dense or depthwise, size-preserving padding, stride 1 except
at most one stride-2 conv whose 2r×2r input patches are unions of 2×2 patches of the grid before
it (checked per input size; elsewhere the block runs its per-layer path). A timm EfficientNet's
``conv_head`` fuses with the ``bn2`` (BatchNorm + activation) after it: the model's
``forward_features`` runs them as one unit (:class:`FusedHeadMixin`).

A fused block right before the model's global average pooling (that EfficientNet head,
torchvision MobileNetV2's ``features.18``: :class:`FusedPoolMixin`) also pools inside the fused
node: the mean is the sum of the last unit's patch sums over H·W, and its gradient g/(H·W) is
already one value per patch, so neither the map's pooling nor the spread-out gradient's
re-pooling runs (exact, like the rest).

On the CPU with the native kernels each direction is one C++ call per block
(``native.fused_block_forward`` / ``fused_block_backward``) under one C++ autograd node
(``native.fused_block``); elsewhere (GPU, ``GRADFILTER_NATIVE=0``) the same steps run as a
Python autograd Function looping over the units with PyTorch ops, the reference path. The native
forward hands each block's output patch sums to the next fused block whose input is that very
tensor, unchanged (same TensorImpl and version), which then does not sum its input map again
(``native.fused_hand_offs`` counts them).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import geometry as GF
from . import native, patches
from ._mixed import mixed_class
from .nn import FilteredConv2d
from .selection import Refusals, match

__all__ = ["FusedBlockMixin", "FusedHeadMixin", "FusedPoolMixin", "enclosing_blocks", "fusable",
           "fuse_blocks"]

_NO_ACT = math.nan  # the stats kernel's "no activation"


@dataclass(frozen=True)
class _Unit:
    """conv → eval BatchNorm → activation (upper bound: inf ReLU, 6 ReLU6, NaN none)."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    upper: float


def _activation_bound(act: nn.Module | None) -> float | str:
    if act is None or isinstance(act, nn.Identity):
        return _NO_ACT
    if isinstance(act, nn.ReLU6):
        return 6.0
    if isinstance(act, nn.ReLU):
        return math.inf
    return f"activation {type(act).__name__} (only ReLU, ReLU6 or none)"


def _bn_unit(conv: nn.Module, bn: nn.Module, act: nn.Module | None) -> _Unit | str:
    if not isinstance(conv, FilteredConv2d):
        return f"{type(conv).__name__} is not a filtered conv (gradfilter.apply it first)"
    if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
        return f"{type(bn).__name__} is not a BatchNorm2d with running statistics"
    if not isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity):
        return "BatchNormAct2d with dropout"
    k = conv.kernel_size
    if conv.stride not in ((1, 1), (2, 2)) or conv.dilation != (1, 1) or k[0] % 2 == 0 or (
            k[1] % 2 == 0):
        return f"conv {tuple(k)} stride {conv.stride} dilation {conv.dilation} (needs stride 1 " \
               "or 2, dilation 1, odd kernel)"
    if not conv.tf_same and tuple(conv.padding) != ((k[0] - 1) // 2, (k[1] - 1) // 2):
        return f"conv padding {conv.padding} does not keep the map size"
    if conv.groups not in (1, conv.in_channels) or (
            conv.groups > 1 and conv.out_channels != conv.in_channels):
        return f"conv groups={conv.groups} (dense or depthwise only)"
    if conv.input_grad != "filtered":
        return "conv with input_grad='exact'"
    upper = _activation_bound(act)
    if isinstance(upper, str):
        return upper
    return _Unit(conv, bn, upper)


def _units(block: nn.Module) -> tuple[list[_Unit], bool] | str:
    """The block's (units, has skip), or why it cannot be fused."""
    name = type(block).__name__
    if hasattr(block, "conv_pwl") and hasattr(block, "conv_dw") and hasattr(block, "bn3"):
        for part in ("aa", "se", "drop_path"):  # timm InvertedResidual
            if not isinstance(getattr(block, part, nn.Identity()), nn.Identity):
                return f"timm {name} with {part} (only plain inverted residuals)"
        pieces = [(block.conv_pw, block.bn1), (block.conv_dw, block.bn2),
                  (block.conv_pwl, block.bn3)]
        units = [_bn_unit(c, b, getattr(b, "act", None)) for c, b in pieces]
        skip = bool(getattr(block, "has_skip", False))
    elif hasattr(block, "use_res_connect") and isinstance(getattr(block, "conv", None),
                                                          nn.Sequential):
        units, mods = [], list(block.conv)  # torchvision InvertedResidual
        i = 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, nn.Sequential):
                units.append(_sequential_unit(m))
                i += 1
            elif i + 1 < len(mods):
                units.append(_bn_unit(m, mods[i + 1], None))
                i += 2
            else:
                return f"{name}: unrecognised layout"
        skip = bool(block.use_res_connect)
    elif isinstance(block, nn.Sequential):  # torchvision Conv2dNormActivation
        units, skip = [_sequential_unit(block)], False
    else:
        return f"{name} is not a supported block (inverted residual or conv-BN-act)"
    for u in units:
        if isinstance(u, str):
            return f"{name}: {u}"
    if sum(u.conv.stride != (1, 1) for u in units) > 1:
        return f"{name}: more than one strided conv"
    if skip and any(u.conv.stride != (1, 1) for u in units):
        return f"{name}: a skip connection around a strided conv"
    radii = {u.conv.radius for u in units}
    if len(radii) != 1:
        return f"{name}: its convs have different radii {sorted(radii)}"
    return units, skip


def _sequential_unit(seq: nn.Sequential) -> _Unit | str:
    mods = list(seq)
    if len(mods) not in (2, 3):
        kinds = ", ".join(type(m).__name__ for m in mods)
        return (f"Sequential of {len(mods)} modules ({kinds}); a fusable one is conv, "
                f"BatchNorm[, activation]")
    return _bn_unit(mods[0], mods[1], mods[2] if len(mods) == 3 else None)


def fusable(block: nn.Module) -> str | None:
    """None if :func:`fuse_blocks` can fuse ``block``, else the reason it cannot."""
    found = _units(block)
    return found if isinstance(found, str) else None


# ----------------------------------------------------------------------------------------------
# The fused forward and its patch-resolution backward


def _grid(h: int, w: int, radius: int) -> tuple[GF.AxisGeometry, GF.AxisGeometry]:
    """The stride-1 patch grid of an h×w map (output grid = input grid, docs/spec.md §2.1)."""
    return (GF.axis_geometry(h, h, 1, 1, 1, radius), GF.axis_geometry(w, w, 1, 1, 1, radius))


def _patch_sums_cm(t: Tensor, gh: GF.AxisGeometry, gw: GF.AxisGeometry,
                   means: bool = False) -> Tensor:
    """Sums of t over the grid's patches (with ``means``: averages over each patch's real
    pixels), channel-major: (C, N·Ph·Pw)."""
    c = t.shape[1]
    sums = patches.patch_mean_output(t, gh, gw)[0].transpose(0, 1).reshape(c, -1)
    return sums / _per_pixel((gh, gw), t.shape[0], t) if means else sums


def _bn_affine(bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(scale γ/σ, shift β − μγ/σ, 1/σ) of an eval-mode BatchNorm."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps).to(dtype)
    mean = bn.running_mean.to(dtype)
    scale = inv_std if bn.weight is None else bn.weight * inv_std
    shift = -mean * scale if bn.bias is None else bn.bias - mean * scale
    return scale, shift, inv_std


def _unit_stats(z: Tensor, scale: Tensor, shift: Tensor, upper: float, gh: GF.AxisGeometry,
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
    count = _patch_sums_cm(mask, gh, gw)
    return (y, count.to(torch.uint8) if small else count, _patch_sums_cm(masked_z, gh, gw),
            _patch_sums_cm(y, gh, gw))


def _params(units: list[_Unit]) -> list[Tensor | None]:
    flat: list[Tensor | None] = []
    for u in units:
        flat += [u.conv.weight, u.conv.bias, u.bn.weight, u.bn.bias]
    return flat


Grid = tuple[GF.AxisGeometry, GF.AxisGeometry]

@dataclass(frozen=True)
class _Geometry:
    """Patch grids of a fused block for one input size: the stride-1 grid at the input
    resolution, then per unit its output grid and, for a stride-2 unit, its conv's input padding
    (TF 'same' or symmetric) and whether its x̃ is the coarsened previous grid."""

    grid_in: Grid
    grids: tuple[Grid, ...]
    strided: tuple[bool, ...]


def _geometry(units: list[_Unit], h: int, w: int) -> _Geometry | None:
    """The block's grids for an h×w input, or None where a stride-2 conv's input patches
    (2r×2r, docs/spec.md §2.2) are not unions of 2×2 patches of the grid before it."""
    radius = units[0].conv.radius
    cur = _grid(h, w, radius)
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
                from .nn import tf_same_total

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
    return _Geometry(grid_in, tuple(grids), tuple(strided))


def _coarsen(t: Tensor, fine: Grid, coarse: Grid) -> Tensor:
    """(C, N·Pf) sums on a grid → (C, N·Pc) sums on the grid of 2×2 unions of its patches."""
    c = t.shape[0]
    ph, pw = coarse[0].patches, coarse[1].patches
    t = t.view(c, -1, fine[0].patches, fine[1].patches)
    t = F.pad(t, (0, 2 * pw - fine[1].patches, 0, 2 * ph - fine[0].patches))
    return t.view(c, -1, ph, 2, pw, 2).sum((3, 5)).reshape(c, -1)


def _refine(t: Tensor, coarse: Grid, fine: Grid) -> Tensor:
    """Per-patch values on the coarse grid repeated onto the fine grid's patches (C, N·Pf)."""
    c = t.shape[0]
    t = t.view(c, -1, coarse[0].patches, coarse[1].patches)
    t = t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return t[:, :, :fine[0].patches, :fine[1].patches].reshape(c, -1)


def _conv_forward(conv: nn.Conv2d, t: Tensor) -> Tensor:
    if conv.stride == (1, 1):
        pad = (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    elif conv.tf_same:
        from .nn import tf_same_pad

        t, pad = tf_same_pad(t, conv.kernel_size, conv.stride, conv.dilation), (0, 0)
    else:
        pad = conv.padding
    return F.conv2d(t, conv.weight, conv.bias, conv.stride, pad, 1, conv.groups)


def _per_pixel(grid: Grid, n: int, like: Tensor) -> Tensor:
    """(1, N·P): the real pixels of each patch, repeated over the batch (cached, read-only)."""
    return _per_pixel_cached(grid[0], grid[1], n, like.device, like.dtype)


@functools.lru_cache(maxsize=256)
def _per_pixel_cached(gh: GF.AxisGeometry, gw: GF.AxisGeometry, n: int, device: torch.device,
                      dtype: torch.dtype) -> Tensor:
    counts = patches.inverse_counts(gh, gw, device, dtype).reciprocal()
    return counts.reshape(1, 1, -1).expand(1, n, -1).reshape(1, -1)


def _unit_backward(g: Tensor, count: Tensor, mz: Tensor | None, scale: Tensor, inv_std: Tensor,
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


_PARAMS = 5  # _FusedBlock's arguments before the units' parameters


class _FusedBlock(torch.autograd.Function):
    """A fused block as one autograd node, in PyTorch ops (the reference path; the native path
    is :func:`native.fused_block`): ``pool`` returns the global average of its output (N, C)
    instead of the map (a block that feeds a global-average-pooling head; no skip)."""

    @staticmethod
    def forward(ctx, x: Tensor, units: list[_Unit], skip: bool, geo: _Geometry, pool: bool,
                *params: Tensor | None):
        n = x.shape[0]
        ctx.meta = (units, skip, geo, n, pool)
        ys = _patch_sums_cm(x, *geo.grid_in)  # the first conv's x̃ (not coarsened)
        prev = geo.grid_in
        saved: list[Tensor | None] = []
        t = x
        for i, u in enumerate(units):
            xt = _coarsen(ys, prev, geo.grids[i]) if geo.strided[i] else ys
            z = _conv_forward(u.conv, t)
            scale, shift, inv_std = _bn_affine(u.bn, z.dtype)
            t, count, mz, ys = _unit_stats(z, scale, shift, u.upper, *geo.grids[i])
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
            g_out = _pooled_patch_means(g_out, geo.grids[-1])
        g = g_out.flatten(1) if pool else _patch_sums_cm(g_out, *geo.grids[-1], means=True)
        grads: list[Tensor | None] = [None] * (4 * len(units))
        for i in reversed(range(len(units))):
            u, grid = units[i], geo.grids[i]
            per_pixel = _per_pixel(grid, n, g)
            xt, count, mz, scale, inv_std, mean, weight = saved[7 * i: 7 * i + 7]
            need_w, need_b, need_gamma, need_beta = needs[_PARAMS + 4 * i: _PARAMS + 4 + 4 * i]
            gscale = 0.25 if geo.strided[i] else 1.0  # docs/spec.md §5: the stride scale
            gbar, g_gamma, g_beta, g_bias = _unit_backward(
                g, count, mz if need_gamma else None, scale, inv_std, mean, per_pixel, gscale)
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
                g = _refine(g, grid, geo.grids[i - 1] if i else geo.grid_in)
        gx = None
        if needs[0]:
            c, (gh, gw) = g.shape[0], geo.grid_in
            gxt = g.view(c, n, gh.patches, gw.patches).transpose(0, 1)
            gx = patches.unpool_input(gxt, gh, gw)
            if skip:
                gx = gx.add_(g_out)
        return (gx, None, None, None, None, *grads)


def _pooled_patch_means(g: Tensor, grid: Grid) -> Tensor:
    """(C, N, P): the patch means of the gradient that a global average pooling hands back for
    g (N, C): g/(H·W) on every patch."""
    gh, gw = grid
    p = gh.patches * gw.patches
    return (g.t() / (gh.size * gw.size)).unsqueeze(-1).expand(-1, -1, p).contiguous()


def _native_forward_static(units: list[_Unit], geo: _Geometry) -> tuple:
    """The fixed arguments of :func:`native.fused_block_forward` for one block and input size
    (cached on the geometry): the input grid, per unit its conv and grid geometry (see the
    kernel), activation bound, BatchNorm eps and the flags that do not depend on what trains."""
    cache = geo.__dict__
    if "_native_forward" not in cache:
        from .nn import tf_same_pads

        g0h, g0w = geo.grid_in
        in_grid = [g0h.radius, g0h.out_pad, g0w.out_pad, g0h.patches, g0w.patches]
        geometry, flags = [], []
        prev = geo.grid_in
        for i, u in enumerate(units):
            conv, (gh, gw) = u.conv, geo.grids[i]
            k, s = conv.kernel_size, conv.stride[0]
            pads = [0, 0, 0, 0]  # left, right, top, bottom
            if s == 1:
                conv_pad = [k[0] // 2, k[1] // 2]
            elif conv.tf_same:  # what _conv_forward's tf_same_pad adds
                conv_pad = [0, 0]
                pads = tf_same_pads((prev[0].size, prev[1].size), k, conv.stride, conv.dilation)
            else:
                conv_pad = list(conv.padding)
            geometry += [s, *conv_pad, *pads, conv.groups, gh.radius, gh.out_pad, gw.out_pad,
                         gh.patches, gw.patches, int(geo.strided[i]), prev[0].patches,
                         prev[1].patches]
            flags.append((2 if gh.radius * gw.radius <= 255 else 0)
                         | (4 if conv.bias is not None else 0)
                         | (8 if u.bn.weight is not None else 0)
                         | (16 if u.bn.bias is not None else 0))
            prev = (gh, gw)
        cache["_native_forward"] = (in_grid, geometry, flags, [u.bn.eps for u in units],
                                    [u.upper for u in units])
    return cache["_native_forward"]


def _native_static(units: list[_Unit], skip: bool, geo: _Geometry, n: int,
                   like: Tensor) -> tuple:
    """The fixed arguments of :func:`native.fused_block_backward` for one block, batch size
    and dtype (cached on the geometry)."""
    key = (n, like.dtype, like.device)
    cache = geo.__dict__.setdefault("_native_static", {})  # frozen dataclass: no attribute set
    if key not in cache:
        gh, gw = geo.grids[-1]
        out_grid = [gh.radius, gh.out_pad, gw.out_pad, gh.patches, gw.patches]
        inv_counts = patches.inverse_counts(gh, gw, like.device, like.dtype)
        per_pixel = [_per_pixel(grid, n, like) for grid in geo.grids]
        grids, flags = [], []
        for i, u in enumerate(units):
            fine = geo.grids[i - 1] if i else geo.grid_in
            grids += [geo.grids[i][0].patches, geo.grids[i][1].patches, fine[0].patches,
                      fine[1].patches]
            flags.append(int(geo.strided[i]) | (32 if u.conv.groups > 1 else 0))
        ih, iw = geo.grid_in
        in_grid = [0, int(skip), ih.size, iw.size, ih.in_patch, iw.in_patch, ih.in_pad,
                   iw.in_pad]
        pool_in = patches.tiny_matrix(ih.size, iw.size, ih, iw, like.dtype)
        cache[key] = (out_grid, inv_counts, per_pixel, grids, flags, in_grid, pool_in)
    return cache[key]


def _run_fused(x: Tensor, units: list[_Unit], skip: bool,
               grids: dict[tuple[int, int, int], _Geometry | None],
               pool: bool = False) -> Tensor | None:
    """The fused node's output for ``x`` (``pool``: its global average, (N, C)), or None where
    the unit chain must run per layer:
    no-grad or nothing to differentiate, autocast (the per-layer filtered convs cast as autocast
    would; the fused node computes in the map's dtype), BatchNorm in training mode, a non-4-D
    or channels-last map (the per-layer native kernels cover NHWC, the fused stats pass does
    not; its PyTorch form made channels-last steps slower than lean ones), or stride-2 grids
    that do not line up for this input size. ``grids``: the block's geometries by (radius, h,
    w), filled here."""
    if x.dim() != 4 or not x.is_contiguous() or not torch.is_grad_enabled() or _autocast(x):
        return None
    params = _params(units)
    trains = x.requires_grad
    for u in units:
        if u.bn.training:
            return None
    for p in params:
        trains = trains or (p is not None and p.requires_grad)
    if not trains:
        return None
    key = (units[0].conv.radius, x.shape[-2], x.shape[-1])
    if key not in grids:
        grids[key] = _geometry(units, key[1], key[2])
    geo = grids[key]
    if geo is None:
        return None
    if native.applies(x):
        stats = [t for u in units for t in (u.bn.running_mean, u.bn.running_var)]
        return native.fused_block(x, [p for p in params if p is not None], stats,
                                  _plan(units, skip, geo, pool, x))
    return _FusedBlock.apply(x, units, skip, geo, pool, *params)


def _autocast(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device type (some types, e.g. meta, have none)."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


class _PlanCache(dict):
    """Native plans by batch, dtype and form. Plans are TorchScript objects, which neither copy
    nor pickle: a copied or unpickled module's cache starts empty (its plans are rebuilt on
    use)."""

    def __deepcopy__(self, memo: dict) -> _PlanCache:
        return _PlanCache()

    def __reduce__(self) -> tuple:  # pickled empty too
        return _PlanCache, ()


def _plan(units: list[_Unit], skip: bool, geo: _Geometry, pool: bool,
          like: Tensor) -> torch.ScriptObject:
    """The native plan of :func:`native.fused_block` for one block, input size, batch and dtype
    (cached on the geometry)."""
    key = (like.shape[0], like.dtype, like.device, pool)
    cache = geo.__dict__.setdefault("_native_plan", _PlanCache())
    if key not in cache:
        in_grid, geometry, flags, eps, upper = _native_forward_static(units, geo)
        out_grid, inv_counts, per_pixel, grids, back_flags, back_in, pool_in = _native_static(
            units, skip, geo, like.shape[0], like)
        gh, gw = geo.grids[-1]
        cache[key] = native.fused_plan(
            in_grid, geometry, flags, eps, upper, skip, pool, out_grid, inv_counts, per_pixel,
            grids, back_flags, back_in, pool_in, gh.size * gw.size, gh.patches * gw.patches)
    return cache[key]


def _grids(module: nn.Module) -> dict[tuple[int, int, int], _Geometry | None]:
    """The fused module's geometry cache (an input size's grids are worked out once)."""
    return module.__dict__.setdefault("_gradfilter_grids", {})


class FusedBlockMixin:
    """Mixed in front of a supported block's class by :func:`fuse_blocks`: its training forward
    runs as one fused node (:mod:`gradfilter.blocks`); no-grad and unsupported calls run the
    block's own forward, as do channels-last inputs."""

    def forward(self, x: Tensor) -> Tensor:
        out = _run_fused(x, *self._gradfilter_units, _grids(self))
        return super().forward(x) if out is None else out


def _hooked(*mods: nn.Module) -> bool:
    """Whether a forward or backward hook (the module's own or a global one) would see what
    these modules' calls return: then a pooled head keeps the map that the hooks expect."""
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks or M._global_backward_hooks or (
            M._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in mods)


def _global_average(pool: nn.Module) -> bool:
    """Whether a timm ``SelectAdaptivePool2d`` is a plain global average, flattened."""
    inner, flat = getattr(pool, "pool", None), getattr(pool, "flatten", None)
    if isinstance(inner, nn.AdaptiveAvgPool2d):
        return inner.output_size in (1, (1, 1)) and isinstance(flat, nn.Flatten) and (
            flat.start_dim == 1 and flat.end_dim == -1)
    try:
        from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
    except ImportError:
        return False
    return (type(inner) is FastAdaptiveAvgPool and inner.flatten
            and getattr(inner, "dim", (2, 3)) == (2, 3) and isinstance(flat, nn.Identity))


class FusedHeadMixin:
    """Mixed in front of a timm ``EfficientNet`` by :func:`fuse_blocks` (block ``conv_head``):
    ``conv_head`` → ``bn2`` (BatchNorm + activation) run as one fused unit. The gradient from
    the pooled head is constant over the map, so this is exact; it spares BatchNorm's and the
    activation's full-resolution backward. Where the model's head is timm's own plain global
    average (and no hook watches ``global_pool``), ``forward`` takes the average straight from
    the fused unit's patch sums and hands its backward one value per sample and channel: the
    full map is neither pooled nor its gradient spread out and pooled again. Same fallbacks as
    a fused block."""

    def _trunk(self, x: Tensor) -> Tensor:
        """timm's forward_features up to the head conv."""
        return self.blocks(self.bn1(self.conv_stem(x)))

    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing:
            return super().forward_features(x)
        x = self._trunk(x)
        out = _run_fused(x, *self._gradfilter_units, _grids(self))
        return self.bn2(self.conv_head(x)) if out is None else out

    def forward(self, x: Tensor) -> Tensor:
        if (self.grad_checkpointing or not self.__dict__.get("_gradfilter_pool")
                or not _global_average(self.global_pool) or _hooked(self.global_pool)):
            return super().forward(x)
        x = self._trunk(x)
        pooled = _run_fused(x, *self._gradfilter_units, _grids(self), pool=True)
        if pooled is None:
            return self.forward_head(self.bn2(self.conv_head(x)))
        if self.drop_rate > 0.0:  # timm's forward_head
            pooled = F.dropout(pooled, p=self.drop_rate, training=self.training)
        return self.classifier(pooled)


class FusedPoolMixin:
    """Mixed in front of a torchvision ``MobileNetV2`` by :func:`fuse_blocks` when its last
    feature block (``features.18``) is fused: the global average pooling after it comes straight
    from the block's patch sums, and the block's backward gets one value per sample and channel
    (see :class:`FusedHeadMixin`). Where hooks watch ``features`` or that block, or the block
    runs per layer, the model runs as torchvision's."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        feats = self.features
        head = feats[-1] if len(feats) else None
        if not isinstance(head, FusedBlockMixin) or _hooked(feats, head):
            return super()._forward_impl(x)
        for m in itertools.islice(feats, len(feats) - 1):
            x = m(x)
        units, skip = head._gradfilter_units
        pooled = None if skip else _run_fused(x, units, skip, _grids(head), pool=True)
        if pooled is None:
            pooled = torch.flatten(F.adaptive_avg_pool2d(head(x), (1, 1)), 1)
        return self.classifier(pooled)


def _head_units(model: nn.Module, name: str,
                conv: nn.Module) -> tuple[nn.Module, _Unit] | str | None:
    """(the EfficientNet, its head unit) when ``name`` is the ``conv_head`` of a timm
    EfficientNet whose ``forward_features`` is timm's own (so the swap keeps its meaning); the
    reason when it is such a head that cannot be fused; None when it is none."""
    try:
        from timm.models.efficientnet import EfficientNet
    except ImportError:
        return None
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf != "conv_head" or not isinstance(owner, EfficientNet) or owner.conv_head is not conv:
        return None
    own_features = type(owner).forward_features is EfficientNet.forward_features
    if not (own_features or isinstance(owner, FusedHeadMixin)):  # a subclass with its own
        return None
    unit = _bn_unit(conv, owner.bn2, getattr(owner.bn2, "act", None))
    return f"head conv_head → bn2: {unit}" if isinstance(unit, str) else (owner, unit)


def _own_pooled_head(cls: type) -> bool:
    """Whether a timm EfficientNet class runs timm's own ``forward`` and ``forward_head`` (so
    :class:`FusedHeadMixin` may pool inside the fused head)."""
    from timm.models.efficientnet import EfficientNet

    return cls.forward is EfficientNet.forward and cls.forward_head is EfficientNet.forward_head


def _pool_owner(model: nn.Module, name: str, block: nn.Module) -> nn.Module | None:
    """The torchvision MobileNetV2 whose last feature block ``block`` (named ``name``) is, if
    its ``_forward_impl`` is torchvision's own and it is not yet swapped; else None."""
    try:
        from torchvision.models import MobileNetV2
    except ImportError:
        return None
    owner_name, _, _ = name.rpartition(".")
    parent_name, _, leaf = owner_name.rpartition(".")
    if leaf != "features":
        return None
    owner = model.get_submodule(parent_name) if parent_name else model
    if (not isinstance(owner, MobileNetV2) or isinstance(owner, FusedPoolMixin)
            or type(owner)._forward_impl is not MobileNetV2._forward_impl
            or not len(owner.features) or owner.features[-1] is not block):
        return None
    return owner


def _fused_class(cls: type, mixin: type = FusedBlockMixin) -> type:
    return mixed_class(mixin, cls, "Fused")


def fuse_blocks(model: nn.Module, names: str | Iterable[str],
                on_unsupported: str = "error") -> list[str]:
    """Fuse the named blocks of ``model`` in place (see the module docstring); return the names
    fused. ``names``: block names or glob patterns; a timm EfficientNet's ``conv_head`` fuses
    with the ``bn2`` after it (:class:`FusedHeadMixin`). Where the fused block is the last before
    the model's global average pooling (that head, torchvision MobileNetV2's ``features.18``:
    :class:`FusedPoolMixin`), the model pools inside the fused node. A block named exactly that
    cannot be fused raises with the reason (``on_unsupported="error"``) or stays as it is
    (``"skip"``); blocks matched by a glob only are fused where they can be.
    :func:`gradfilter.remove` undoes it. Call after :func:`gradfilter.apply` (the blocks' convs
    must be filtered); BatchNorm must be in eval mode when training (:func:`gradfilter.freeze`
    pins it)."""
    refusals = Refusals("fuse_blocks", "block", names, on_unsupported)
    patterns = refusals.patterns
    fused: list[str] = []
    inside: list[str] = []  # fused blocks (earlier calls included): their sub-modules are parts
    for name, mod in model.named_modules():
        if not name:
            continue
        if any(name.startswith(f"{b}.") for b in inside):
            refusals.refuse(name, "inside a fused block")
            continue
        if isinstance(mod, FusedBlockMixin):
            inside.append(name)
            refusals.refuse(name, "already fused")
            continue
        if not match(name, patterns):
            continue
        found = _units(mod)
        head = _head_units(model, name, mod) if isinstance(found, str) else None
        if isinstance(head, str):
            found = head
        elif head is not None:  # EfficientNet's conv_head: its owner runs conv_head → bn2 fused
            owner, unit = head
            if isinstance(owner, FusedHeadMixin):
                found = "already fused"
            else:
                owner._gradfilter_units = ([unit], False)
                owner._gradfilter_pool = _own_pooled_head(type(owner))
                owner._gradfilter_original_class = type(owner)
                owner.__class__ = _fused_class(type(owner), FusedHeadMixin)
                fused.append(name)
                continue
        if isinstance(found, str):
            refusals.refuse(name, found)
            continue
        mod._gradfilter_units = found
        mod._gradfilter_original_class = type(mod)
        mod.__class__ = _fused_class(type(mod))
        fused.append(name)
        inside.append(name)
        owner = _pool_owner(model, name, mod)
        if owner is not None:  # MobileNetV2's features.18: pool inside it
            owner._gradfilter_original_class = type(owner)
            owner.__class__ = _fused_class(type(owner), FusedPoolMixin)
    if not fused:
        raise refusals.nothing_fused()
    return fused


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def enclosing_blocks(model: nn.Module, convs: Iterable[str]) -> list[str]:
    """The blocks :func:`fuse_blocks` can fuse around the filtered convs named ``convs``, in
    module order, each once. For each conv, its enclosing modules are looked at from the
    outermost (the model itself excluded): the first whose convs are all filtered and which is a
    supported block is chosen; plain containers (``nn.Sequential``, ``nn.ModuleList``,
    ``nn.ModuleDict``) are looked into; any other module that cannot be fused ends the search
    (a ResNet ``BasicBlock``: its parts stay per layer, as the block's own gradients are not
    patch-constant inside). A timm EfficientNet's ``conv_head`` is chosen itself (it fuses with
    ``bn2``)."""
    chosen: set[str] = set()
    for conv in convs:
        parts = conv.split(".")
        for depth in range(1, len(parts)):
            name = ".".join(parts[:depth])
            block = model.get_submodule(name)
            inner = [m for m in block.modules() if isinstance(m, nn.Conv2d | nn.Conv1d)]
            if all(isinstance(m, FilteredConv2d) for m in inner) and fusable(block) is None:
                chosen.add(name)
                break
            if type(block) not in _CONTAINERS:
                break
        else:
            head = _head_units(model, conv, model.get_submodule(conv))
            if head is not None and not isinstance(head, str):
                chosen.add(conv)
    return [name for name, _ in model.named_modules() if name in chosen]
