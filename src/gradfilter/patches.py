"""Patch passes of the filtered convolution: the only passes over full-resolution tensors.

Sums of the input over its patches (x̃, saved by the forward), means of the output gradient over
its patches (ḡ), and the repetition of the patch-resolution input gradient over each input patch,
each with its CPU dispatch: the native kernels (:mod:`gradfilter.native`) where they apply, small
GEMMs on tiny maps, strided PyTorch sums elsewhere.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .geometry import AxisGeometry, ceil_div

__all__ = [
    "dense_format",
    "fast_patch_sum",
    "inverse_counts",
    "kernel_sum",
    "patch_mean_output",
    "patch_mean_scale",
    "patch_sum_input",
    "sum_exact",
    "summed_kernel",
    "tiny_matrix",
    "unpool_input",
]


# Work on at most this many bytes of a full-resolution map at a time, so that intermediates stay
# in cache and below malloc's mmap threshold (fresh mmapped pages cost more than the arithmetic).
_CHUNK_BYTES = 8 << 20


def _batch_chunks(t: Tensor) -> int:
    if t.device.type != "cpu":  # GPUs: one launch over the whole batch beats cache-sized pieces
        return max(t.shape[0], 1)
    per_sample = t[0].numel() * t.element_size() if t.shape[0] else 1
    return max(1, _CHUNK_BYTES // max(per_sample, 1))


def _strided_sum(t: Tensor, dim: int, k: int) -> Tensor:
    """Sum of every k consecutive entries along ``dim`` (length divisible by k)."""
    if k > 4:
        return t.unflatten(dim, (t.shape[dim] // k, k)).sum(dim if dim < 0 else dim + 1)
    idx = [slice(None)] * t.dim()

    def part(j):
        idx[dim] = slice(j, None, k)
        return t[tuple(idx)]

    out = part(0) + part(1)
    for j in range(2, k):
        out.add_(part(j))
    return out


def sum_exact(t: Tensor, kh: int, kw: int) -> Tensor:
    """Sum over non-overlapping kh×kw patches of a map that the patches tile exactly."""
    if kh == 1 and kw == 1:
        return t

    if t.device.type != "cpu":  # the pooling kernel beats a 6-D reduction (profiled on H200)
        return F.avg_pool2d(t, (kh, kw)).mul_(kh * kw)

    def pool(c: Tensor) -> Tensor:
        if kh > 1:  # rows first: strided row adds read whole contiguous rows
            c = _strided_sum(c, -2, kh)
        return _strided_sum(c, -1, kw) if kw > 1 else c

    step = _batch_chunks(t)
    if step >= t.shape[0]:
        return pool(t)
    n, c, h, w = t.shape
    out = t.new_empty(n, c, h // kh, w // kw)
    for i in range(0, n, step):
        out[i : i + step] = pool(t[i : i + step])
    return out


# Tiny maps (the 7×7 maps of a network's last blocks, 2×2 patches): per-row loops of a few
# elements cost more than the arithmetic there. Unpooling is one small GEMM with a 0/1
# membership matrix, which MKL vectorises across planes (2–4× the native loops); pooling is too
# where the native kernels are off (with them, their tiny-map kernel is faster still).
_TINY_PIXELS, _TINY_PATCHES = 256, 4


def dense_format(x: Tensor) -> torch.memory_format | None:
    """The memory format x is dense in: plain (also when ambiguous), 4-D channels-last, or None."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _tiny(pixels: int, patches: int) -> bool:
    return pixels <= _TINY_PIXELS and patches <= _TINY_PATCHES


def _axis_membership(size: int, k: int, pad: int, patches: int) -> Tensor:
    """(size, patches) 0/1: position h lies in patch i, i.e. i·k − pad <= h < (i+1)·k − pad."""
    pos = torch.arange(size).unsqueeze(1)
    start = torch.arange(patches).unsqueeze(0) * k - pad
    return ((pos >= start) & (pos < start + k)).double()


@functools.lru_cache(maxsize=256)
def _pool_matrix(h: int, w: int, kh: int, kw: int, top: int, left: int, ph: int, pw: int,
                 dtype: torch.dtype) -> Tensor:
    """(h·w, ph·pw) 0/1 matrix mapping each pixel of an h×w plane to its patch (CPU, cached)."""
    rows, cols = _axis_membership(h, kh, top, ph), _axis_membership(w, kw, left, pw)
    return torch.kron(rows, cols).to(dtype)


def tiny_matrix(h: int, w: int, gh: AxisGeometry, gw: AxisGeometry,
                 dtype: torch.dtype) -> Tensor | None:
    """The pooling matrix of an h×w map's input grid if the map is tiny (for unpooling by GEMM)."""
    if not _tiny(h * w, gh.patches * gw.patches):
        return None
    return _pool_matrix(h, w, gh.in_patch, gw.in_patch, gh.in_pad, gw.in_pad, gh.patches,
                        gw.patches, dtype)


def fast_patch_sum(t: Tensor, kh: int, kw: int, top: int, left: int, ph: int,
                    pw: int) -> Tensor | None:
    """Patch sums by the native kernel or a tiny-map GEMM; None where neither applies."""
    if t.device.type != "cpu":
        return None
    if native.applies(t):  # tiny maps too: 1.5–2.5× the GEMM; MobileNetV2 last 4 steps are
        return native.patch_sum(t, kh, kw, top, left, ph, pw)  # 5 ms faster (ab_switch.py)
    n, c, h, w = t.shape
    if _tiny(h * w, ph * pw) and t.is_floating_point() and t.is_contiguous():
        k = _pool_matrix(h, w, kh, kw, top, left, ph, pw, t.dtype)
        flat = t.reshape(n * c, h * w)
        return torch.mm(k.t(), flat.t()).t().reshape(n, c, ph, pw)
    return None


def patch_sum_input(x: Tensor, gh: AxisGeometry, gw: AxisGeometry) -> Tensor:
    """x̃: sum of x over each input patch (stride-scaled, grid centred on the map; docs/spec.md
    §2.2)."""
    fast = fast_patch_sum(x, gh.in_patch, gw.in_patch, gh.in_pad, gw.in_pad, gh.patches,
                           gw.patches)
    if fast is not None:
        return fast
    pads = []
    for dim, g in ((-2, gh), (-1, gw)):
        span = g.patches * g.in_patch
        if g.in_pad < 0:  # the grid lies inside the map: a view, no copy
            x = x.narrow(dim, -g.in_pad, span)
            pads.append((0, 0))
        else:  # the grid overhangs the map: zero padding adds nothing to a sum
            pads.append((g.in_pad, span - g.size - g.in_pad))
    (top, bottom), (left, right) = pads
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))
    return sum_exact(x, gh.in_patch, gw.in_patch)


def _padded_axis_sum(t: Tensor, dim: int, g: AxisGeometry) -> Tensor:
    """Sums over the output patches of one axis whose grid overhangs the map (0 < pad < r)."""
    length, k, pad = t.shape[dim], g.radius, g.out_pad
    shape = list(t.shape)
    shape[dim] = g.patches
    out = t.new_zeros(shape)
    for j in range(k):  # offset j inside each patch: one strided slice of the map
        lo = max(0, ceil_div(pad - j, k))
        hi = min(g.patches, (length - 1 - j + pad) // k + 1)
        if hi > lo:
            src = t.narrow(dim, lo * k + j - pad, (hi - lo - 1) * k + 1)
            idx = [slice(None)] * t.dim()
            idx[dim] = slice(None, None, k)
            out.narrow(dim, lo, hi - lo).add_(src[tuple(idx)])
    return out


def _tiles(gy: Tensor, gh: AxisGeometry, gw: AxisGeometry) -> bool:
    """Whether the output patch grid tiles gy exactly (then every patch has r·r real pixels)."""
    return gh.out_pad == 0 and gw.out_pad == 0 and gh.patches * gh.radius == gy.shape[-2] and (
        gw.patches * gw.radius == gy.shape[-1])


def patch_mean_output(
    gy: Tensor, gh: AxisGeometry, gw: AxisGeometry
) -> tuple[Tensor, float | Tensor, Tensor]:
    """ḡ = sums · scale: gy averaged over the real pixels of each output patch (docs/spec.md §4.1).

    Returns (sums, scale, bias gradient). The channel sum of gy is the exact bias gradient
    (docs/spec.md §4.5),
    taken from the patch sums so that gy is read only once. The scale is 1/(r·r) where the grid
    tiles the map, else a (Ph, Pw) map of 1/(real pixels per patch); callers fold it into the
    small patch-resolution products instead of spending a pass on it.
    """
    rh, rw = gh.radius, gw.radius
    sums = fast_patch_sum(gy, rh, rw, gh.out_pad, gw.out_pad, gh.patches, gw.patches)
    if sums is None:
        sums = sum_exact(gy, rh, rw) if _tiles(gy, gh, gw) else _padded_patch_sums(gy, gh, gw)
    return sums, patch_mean_scale(gy, gh, gw), sums.sum((0, 2, 3))


def patch_mean_scale(gy: Tensor, gh: AxisGeometry, gw: AxisGeometry) -> float | Tensor:
    """ḡ's scale: 1/(r·r) where the grid tiles gy, else a (Ph, Pw) map of 1/(real pixels)."""
    if _tiles(gy, gh, gw):
        return 1.0 / (gh.radius * gw.radius)
    return inverse_counts(gh, gw, gy.device, gy.dtype)


def _padded_patch_sums(gy: Tensor, gh: AxisGeometry, gw: AxisGeometry) -> Tensor:
    """Output patch sums where the grid does not tile the map exactly (PyTorch ops)."""
    rh, rw = gh.radius, gw.radius
    bottom = gh.patches * rh - gy.shape[-2] - gh.out_pad
    right = gw.patches * rw - gw.out_pad - gy.shape[-1]
    if bottom >= 0 and right >= 0:  # the grid covers the map: zero-extend once, then tile
        sums = sum_exact(F.pad(gy, (gw.out_pad, right, gh.out_pad, bottom)), rh, rw)
    else:
        rows = _padded_axis_sum(gy, -2, gh) if gh.out_pad or gh.patches * rh != gy.shape[-2] \
            else (_strided_sum(gy, -2, rh) if rh > 1 else gy)
        if gw.out_pad or gw.patches * rw != gy.shape[-1]:
            sums = _padded_axis_sum(rows, -1, gw)
        else:
            sums = _strided_sum(rows, -1, rw) if rw > 1 else rows
    return sums


@functools.lru_cache(maxsize=256)
def inverse_counts(gh: AxisGeometry, gw: AxisGeometry, device: torch.device,
                    dtype: torch.dtype) -> Tensor:
    """(Ph, Pw) map of 1 / (real output pixels per patch); cached per geometry (read-only)."""
    counts = torch.outer(_real_counts(gh, device), _real_counts(gw, device))
    return counts.reciprocal().to(dtype)


def _real_counts(g: AxisGeometry, device: torch.device) -> Tensor:
    """Number of real (non-padding) output pixels in each patch along one axis."""
    start = torch.arange(g.patches, device=device) * g.radius - g.out_pad
    return ((start + g.radius).clamp(max=g.out_size) - start.clamp(min=0)).double()


def _repeat_patches_into(out: Tensor, g: Tensor, kh: int, kw: int) -> None:
    """Nearest upsampling of g by (kh, kw) into out: columns first on the small map, then rows."""
    n, c, ph, pw = g.shape
    if out.device.type != "cpu":  # one copy kernel
        out.view(n, c, ph, kh, pw, kw).copy_(g[:, :, :, None, :, None].expand(
            n, c, ph, kh, pw, kw))
        return
    if kw > 1:
        g = g.unsqueeze(-1).expand(n, c, ph, pw, kw).reshape(n, c, ph, pw * kw)
    out.view(n, c, ph, kh, pw * kw).copy_(g.unsqueeze(-2).expand(n, c, ph, kh, pw * kw))


def unpool_input(gxt: Tensor, gh: AxisGeometry, gw: AxisGeometry,
                 channels_last: bool = False) -> Tensor:
    """gx: g̃x repeated over each input patch, cropped (or zero-extended) to the input map
    (docs/spec.md §4.4).

    ``gxt`` may be a permuted view; the expansion copies it into a contiguous layout (channels-last
    with ``channels_last=True`` on the native CPU path, to match a channels-last input).
    """
    n, c, ph, pw = gxt.shape
    kh, kw = gh.in_patch, gw.in_patch
    if channels_last and native.applies(gxt):
        gxt = gxt.contiguous(memory_format=torch.channels_last)
        return native.unpool(gxt, gh.size, gw.size, kh, kw, gh.in_pad, gw.in_pad)
    k = tiny_matrix(gh.size, gw.size, gh, gw, gxt.dtype) if gxt.device.type == "cpu" else None
    if k is not None:
        return torch.mm(gxt.reshape(n * c, ph * pw), k.t()).view(n, c, gh.size, gw.size)
    if native.applies(gxt):  # g̃x may come channels-last from the products; gx stays plain
        return native.unpool(gxt.contiguous(), gh.size, gw.size, kh, kw, gh.in_pad, gw.in_pad)
    return _unpool_pytorch(gxt, gh, gw)


def _unpool_pytorch(gxt: Tensor, gh: AxisGeometry, gw: AxisGeometry) -> Tensor:
    """:func:`unpool_input` from PyTorch ops: expand-copy in cache-sized pieces, then crop."""
    n, c, ph, pw = gxt.shape
    kh, kw = gh.in_patch, gw.in_patch
    if kh == 1 and kw == 1:
        full = gxt.contiguous()
    else:
        full = gxt.new_empty(n, c, ph * kh, pw * kw)
        step = _batch_chunks(full)
        for i in range(0, n, step):
            _repeat_patches_into(full[i : i + step], gxt[i : i + step], kh, kw)
    top, left = gh.in_pad, gw.in_pad
    bottom = ph * kh - gh.size - top
    right = pw * kw - gw.size - left
    if top or left or bottom or right:
        full = F.pad(full, (-left, -right, -top, -bottom))
    return full


# ----------------------------------------------------------------------------------------------
# Patch-resolution products (docs/spec.md §4.3, §4.4) and their dilated form (docs/spec.md §6)


def summed_kernel(weight: Tensor, gh: AxisGeometry, gw: AxisGeometry) -> Tensor:
    """W̃: the kernel summed over the axes whose taps are not kept (docs/spec.md §4.2)."""
    dims = [d for d, g in ((2, gh), (3, gw)) if not g.keeps_taps]
    return weight.sum(dims, keepdim=True) if dims else weight


def kernel_sum(weight: Tensor) -> Tensor:
    """W̃ (Cout, Cin/G): the kernel summed over all taps, as a matrix-vector product."""
    cout, cpg = weight.shape[:2]
    taps = weight.shape[2] * weight.shape[3]
    if taps == 1:
        return weight.reshape(cout, cpg)
    flat = weight.reshape(cout * cpg, taps)
    return torch.mv(flat, flat.new_ones(taps)).reshape(cout, cpg)
