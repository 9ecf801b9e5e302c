"""Gradient-filtered convolution: the math of DESIGN §1, and nothing else.

The forward is the plain convolution (bit-identical to ``F.conv2d``/``F.conv1d``) and saves only
the patch sums of the input, x̃, plus the kernel summed over its non-dilated taps, W̃. The backward
replaces the output gradient by its mean over r×r patches, which turns the convolution backward into
small matrix products at patch resolution followed by a nearest upsampling of the input gradient.

Everything is computed in 2-D; a 1-D convolution is a 2-D one with a height of one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

IntOrPair = int | tuple[int, ...]

#: How a filtered conv computes the gradient it passes down (its input gradient):
#: ``"filtered"`` from the patch-mean output gradient (DESIGN §1, the paper: cheap, approximate);
#: ``"exact"`` from the full output gradient and the weight (exact, full backward-input cost). The
#: weight gradient is filtered in both, and both save the same tensors (x̃ and the weight).
INPUT_GRAD_MODES = ("filtered", "exact")

__all__ = [
    "UnsupportedDilationError",
    "AxisGeometry",
    "INPUT_GRAD_MODES",
    "axis_geometry",
    "check_dilation",
    "conv1d",
    "conv2d",
    "validate_input_grad",
    "validate_radius",
]


class UnsupportedDilationError(ValueError):
    """A dilation the filtered backward cannot represent at patch resolution (DESIGN §1.8)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _half_up(a: int) -> int:
    """ceil(a / 2) for any integer, negative included."""
    return -((-a) // 2)


@dataclass(frozen=True)
class AxisGeometry:
    """Patch geometry of one spatial axis (DESIGN §1.1–§1.3, §1.8)."""

    size: int  # input length
    out_size: int  # output length
    kernel: int
    stride: int
    radius: int
    patches: int  # P = ceil(out_size / radius)
    out_pad: int  # rows of padding before the output grid (0 <= out_pad < radius)
    in_pad: int  # rows of padding before the input grid (negative: the grid starts inside)
    tap_dilation: int  # 0: taps summed; otherwise the dilation of the conv at patch resolution

    @property
    def in_patch(self) -> int:
        """Input patch length: the output patch scaled by the stride."""
        return self.radius * self.stride

    @property
    def keeps_taps(self) -> bool:
        return self.tap_dilation > 0


def check_dilation(kernel: int, stride: int, dilation: int, radius: int) -> int:
    """Return the patch-resolution dilation of one axis (0 when the taps are summed).

    Taps closer than one input patch fall into the same or the next patch and are summed (§1.4).
    Taps at least a patch apart (atrous convs) are kept: the conv at patch resolution then has
    dilation ``d / (r·s)``, which must be an integer with a centred kernel (§1.8).
    """
    in_patch = radius * stride
    if kernel == 1 or dilation == 1 or dilation < in_patch:
        return 0
    if dilation % in_patch or ((kernel - 1) * (dilation // in_patch)) % 2:
        raise UnsupportedDilationError(
            f"dilation {dilation} with kernel {kernel}, stride {stride} and radius {radius} is not "
            f"handled: a dilation of at least radius*stride={in_patch} must be a multiple of it "
            f"with a centred kernel; pick a radius that divides {dilation} (or one above it)"
        )
    return dilation // in_patch


def axis_geometry(
    size: int, out_size: int, kernel: int, stride: int, dilation: int, radius: int
) -> AxisGeometry:
    patches = _ceil_div(out_size, radius)
    return AxisGeometry(
        size=size,
        out_size=out_size,
        kernel=kernel,
        stride=stride,
        radius=radius,
        patches=patches,
        out_pad=_half_up(patches * radius - out_size),
        in_pad=_half_up(patches * radius * stride - size),
        tap_dilation=check_dilation(kernel, stride, dilation, radius),
    )


def validate_radius(radius: object, ndim: int = 2) -> tuple[int, ...]:
    """Normalise ``radius`` to a tuple of ``ndim`` positive ints, or raise one clear error."""
    values = radius if isinstance(radius, (tuple, list)) else (radius,) * ndim
    if len(values) != ndim or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise TypeError(f"radius must be an int (or {ndim} ints), got {radius!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"radius must be >= 1, got {radius!r}")
    return tuple(values)


# ----------------------------------------------------------------------------------------------
# Patch pooling and unpooling (the only passes over full-resolution tensors)


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


def _sum_exact(t: Tensor, kh: int, kw: int) -> Tensor:
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


def _dense_format(x: Tensor) -> torch.memory_format | None:
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


def _tiny_matrix(h: int, w: int, gh: AxisGeometry, gw: AxisGeometry,
                 dtype: torch.dtype) -> Tensor | None:
    """The pooling matrix of an h×w map's input grid if the map is tiny (for unpooling by GEMM)."""
    if not _tiny(h * w, gh.patches * gw.patches):
        return None
    return _pool_matrix(h, w, gh.in_patch, gw.in_patch, gh.in_pad, gw.in_pad, gh.patches,
                        gw.patches, dtype)


def _fast_patch_sum(t: Tensor, kh: int, kw: int, top: int, left: int, ph: int,
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
    """x̃: sum of x over each input patch (stride-scaled, grid centred on the map; §1.3)."""
    fast = _fast_patch_sum(x, gh.in_patch, gw.in_patch, gh.in_pad, gw.in_pad, gh.patches,
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
    return _sum_exact(x, gh.in_patch, gw.in_patch)


def _padded_axis_sum(t: Tensor, dim: int, g: AxisGeometry) -> Tensor:
    """Sums over the output patches of one axis whose grid overhangs the map (0 < pad < r)."""
    length, k, pad = t.shape[dim], g.radius, g.out_pad
    shape = list(t.shape)
    shape[dim] = g.patches
    out = t.new_zeros(shape)
    for j in range(k):  # offset j inside each patch: one strided slice of the map
        lo = max(0, _ceil_div(pad - j, k))
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
    """ḡ = sums · scale: gy averaged over the real pixels of each output patch (§1.2).

    Returns (sums, scale, bias gradient). The channel sum of gy is the exact bias gradient (§1.7),
    taken from the patch sums so that gy is read only once. The scale is 1/(r·r) where the grid
    tiles the map, else a (Ph, Pw) map of 1/(real pixels per patch); callers fold it into the
    small patch-resolution products instead of spending a pass on it.
    """
    rh, rw = gh.radius, gw.radius
    sums = _fast_patch_sum(gy, rh, rw, gh.out_pad, gw.out_pad, gh.patches, gw.patches)
    if sums is None:
        sums = _sum_exact(gy, rh, rw) if _tiles(gy, gh, gw) else _padded_patch_sums(gy, gh, gw)
    return sums, _patch_mean_scale(gy, gh, gw), sums.sum((0, 2, 3))


def _patch_mean_scale(gy: Tensor, gh: AxisGeometry, gw: AxisGeometry) -> float | Tensor:
    """ḡ's scale: 1/(r·r) where the grid tiles gy, else a (Ph, Pw) map of 1/(real pixels)."""
    if _tiles(gy, gh, gw):
        return 1.0 / (gh.radius * gw.radius)
    return _inverse_counts(gh, gw, gy.device, gy.dtype)


def _padded_patch_sums(gy: Tensor, gh: AxisGeometry, gw: AxisGeometry) -> Tensor:
    """Output patch sums where the grid does not tile the map exactly (PyTorch ops)."""
    rh, rw = gh.radius, gw.radius
    bottom = gh.patches * rh - gy.shape[-2] - gh.out_pad
    right = gw.patches * rw - gw.out_pad - gy.shape[-1]
    if bottom >= 0 and right >= 0:  # the grid covers the map: zero-extend once, then tile
        sums = _sum_exact(F.pad(gy, (gw.out_pad, right, gh.out_pad, bottom)), rh, rw)
    else:
        rows = _padded_axis_sum(gy, -2, gh) if gh.out_pad or gh.patches * rh != gy.shape[-2] \
            else (_strided_sum(gy, -2, rh) if rh > 1 else gy)
        if gw.out_pad or gw.patches * rw != gy.shape[-1]:
            sums = _padded_axis_sum(rows, -1, gw)
        else:
            sums = _strided_sum(rows, -1, rw) if rw > 1 else rows
    return sums


@functools.lru_cache(maxsize=256)
def _inverse_counts(gh: AxisGeometry, gw: AxisGeometry, device: torch.device,
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
    """gx: g̃x repeated over each input patch, cropped (or zero-extended) to the input map (§1.6).

    ``gxt`` may be a permuted view; the expansion copies it into a contiguous layout (channels-last
    with ``channels_last=True`` on the native CPU path, to match a channels-last input).
    """
    n, c, ph, pw = gxt.shape
    kh, kw = gh.in_patch, gw.in_patch
    if channels_last and native.applies(gxt):
        gxt = gxt.contiguous(memory_format=torch.channels_last)
        return native.unpool(gxt, gh.size, gw.size, kh, kw, gh.in_pad, gw.in_pad)
    k = _tiny_matrix(gh.size, gw.size, gh, gw, gxt.dtype) if gxt.device.type == "cpu" else None
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
# Patch-resolution products (§1.5, §1.6) and their dilated form (§1.8)


def _summed_kernel(weight: Tensor, gh: AxisGeometry, gw: AxisGeometry) -> Tensor:
    """W̃: the kernel summed over the axes whose taps are not kept (§1.4)."""
    dims = [d for d, g in ((2, gh), (3, gw)) if not g.keeps_taps]
    return weight.sum(dims, keepdim=True) if dims else weight


def _kernel_sum(weight: Tensor) -> Tensor:
    """W̃ (Cout, Cin/G): the kernel summed over all taps, as a matrix-vector product."""
    cout, cpg = weight.shape[:2]
    taps = weight.shape[2] * weight.shape[3]
    if taps == 1:
        return weight.reshape(cout, cpg)
    flat = weight.reshape(cout * cpg, taps)
    return torch.mv(flat, flat.new_ones(taps)).reshape(cout, cpg)


# From this many multiply-adds per product, CPU patch products run in oneDNN's 1×1 conv backward
# (both in one call) instead of MKL GEMMs: 1.7–2.0× faster alone on the per-layer benchmark's
# products of ≥ 100M (benchmarks/kernel_micro.py). Below it oneDNN can win alone yet loses
# inside a backward: the one-call native backward with MKL GEMMs is 1.05–1.2× faster at 26M, and
# on ResNet18 and MobileNetV2 at r=4 (≤ 17M) oneDNN cost ~1 ms per step (benchmarks/ab_switch.py).
_ONEDNN_MACS = 64_000_000
_CPU_ONEDNN = True  # private switch for benchmarks/ab_switch.py


def _onednn_sized(n: int, patches: int, cout: int, cin: int) -> bool:
    """Whether a dense conv's patch products are large enough for oneDNN (see _ONEDNN_MACS)."""
    return n * patches * cout * cin >= _ONEDNN_MACS


def _onednn_products(gbar, xt, weight, cin, scale, need_w, need_x):
    """gW̃ and g̃x of a dense conv on the CPU: oneDNN's 1×1 conv backward, both in one call.

    oneDNN's own AVX-512 kernels beat the MKL GEMMs behind ``mm`` on large products (see
    ``_ONEDNN_MACS``). Both products stay in the layout of ḡ: on plain maps, copies to
    channels-last cost as much as they speed oneDNN up.
    """
    n, cout, ph, pw = gbar.shape
    fmt = torch.channels_last if _dense_format(gbar) is torch.channels_last \
        else torch.contiguous_format
    gbar = gbar.contiguous(memory_format=fmt)
    w_t = (_kernel_sum(weight).to(gbar.dtype) * scale).reshape(cout, cin, 1, 1) if need_x \
        else gbar.new_zeros(()).expand(cout, cin, 1, 1)
    x_in = xt.to(gbar.dtype).contiguous(memory_format=fmt) if need_w \
        else gbar.new_zeros(()).expand(n, cin, ph, pw)
    gxt, gw_, _ = torch.ops.aten.convolution_backward(
        gbar, x_in, w_t, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [need_x, need_w, False])
    return (gw_.reshape(cout, cin).mul_(scale) if need_w else None), gxt


def _pointwise_grads(gbar, xt, weight, w_shape, groups, scale, need_w, need_x):
    """Taps summed on both axes: gW̃ and g̃x are matrix products over (batch × patches).

    Returns gW̃ (Cout, Cin/G) and g̃x (N, Cin, Ph, Pw). Dense convs with products of at least
    ``_ONEDNN_MACS`` on the CPU use oneDNN; others one GEMM per product, choosing the layout that
    moves fewer bytes. Depthwise convs are elementwise.
    """
    if isinstance(scale, Tensor):  # per-patch 1/count where the grid overhangs the map
        gbar, scale = gbar * scale, 1.0
    n, cout, ph, pw = gbar.shape
    p = ph * pw
    cpg = w_shape[1]
    cin = cpg * groups
    depthwise = cout == groups and cpg == 1
    if not depthwise and groups == 1 and gbar.device.type == "cpu" and _CPU_ONEDNN and (
            _onednn_sized(n, p, cout, cin)):
        return _onednn_products(gbar, xt, weight, cin, scale, need_w, need_x)
    narrow = p < 128 and groups == 1  # narrow GEMMs: one big GEMM on channel-major copies
    g_t = gbar.transpose(0, 1).reshape(cout, n * p) if narrow and not depthwise else None
    gw_ = gxt = None
    if need_w:
        xt = xt.to(gbar.dtype)
        if depthwise:
            gw_ = (gbar * xt).sum((0, 2, 3)).reshape(cout, 1)
        elif groups == 1 and g_t is None and n * cout * cin <= n * p * (cout + cin):
            gw_ = torch.bmm(gbar.reshape(n, cout, p), xt.reshape(n, cin, p).transpose(1, 2)).sum(0)
        elif groups == 1:
            if g_t is None:
                g_t = gbar.transpose(0, 1).reshape(cout, n * p)
            gw_ = torch.mm(g_t, xt.transpose(0, 1).reshape(cin, n * p).t())
        else:
            gw_ = torch.einsum(
                "ngop,ngip->goi",
                gbar.reshape(n, groups, cout // groups, p),
                xt.reshape(n, groups, cpg, p),
            ).reshape(cout, cpg)
        gw_ = gw_.mul_(scale)
    if need_x:
        w_t = _kernel_sum(weight).to(gbar.dtype) * scale  # W̃ · scale (a new tensor)
        if depthwise:
            gxt = gbar * w_t.reshape(1, cout, 1, 1)
        elif g_t is not None:
            gxt = torch.mm(w_t.t(), g_t).reshape(cin, n, ph, pw).transpose(0, 1)
        elif groups == 1:
            gxt = torch.matmul(w_t.t(), gbar.reshape(n, cout, p)).reshape(n, cin, ph, pw)
        else:
            gxt = torch.einsum(
                "goi,ngop->ngip",
                w_t.reshape(groups, cout // groups, cpg),
                gbar.reshape(n, groups, cout // groups, p),
            ).reshape(n, cin, ph, pw)
    return gw_, gxt


def _patch_conv_args(kernel_shape, gh: AxisGeometry, gw: AxisGeometry):
    """Padding and dilation of the 'same' conv at patch resolution with this kernel shape."""
    dil = (max(gh.tap_dilation, 1), max(gw.tap_dilation, 1))
    pad = ((kernel_shape[2] - 1) * dil[0] // 2, (kernel_shape[3] - 1) * dil[1] // 2)
    return pad, dil


def _taps_shape(w_shape, gh: AxisGeometry, gw: AxisGeometry) -> tuple[int, int, int, int]:
    """Shape of W̃: taps kept only along the axes that keep them."""
    return (w_shape[0], w_shape[1], w_shape[2] if gh.keeps_taps else 1,
            w_shape[3] if gw.keeps_taps else 1)


def _tap_grads(gbar, xt, weight, w_shape, groups, scale, need_w, need_x, gh, gw):
    """Taps kept on an axis (atrous, §1.8): the conv at patch resolution, dilation d/(r·s)."""
    taps = _taps_shape(w_shape, gh, gw)
    pad, dil = _patch_conv_args(taps, gh, gw)
    gbar = gbar * scale  # scale: a float, or a (Ph, Pw) map of 1/(real pixels per patch)
    gw_ = gxt = None
    if need_w:
        gw_ = torch.nn.grad.conv2d_weight(xt.to(gbar.dtype), taps, gbar, 1, pad, dil, groups)
    if need_x:
        n, _, ph, pw = gbar.shape
        wsum = _summed_kernel(weight, gh, gw).to(gbar.dtype)
        gxt = torch.nn.grad.conv2d_input(
            (n, w_shape[1] * groups, ph, pw), wsum, gbar, 1, pad, dil, groups
        )
    return gw_, gxt


# ----------------------------------------------------------------------------------------------
# The autograd Function


class _FilteredConv(torch.autograd.Function):
    """conv forward; gradient-filtered backward (DESIGN §1). Works on 2-D views of 1-D convs."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, radius, one_d,
                exact_gx=False):
        if one_d:
            y = F.conv1d(x, weight, bias, stride[1:], padding, dilation[1:], groups)
            x2, w2, y2 = x.unsqueeze(-2), weight.unsqueeze(-2), y.unsqueeze(-2)
        else:
            y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
            x2, w2, y2 = x, weight, y
        gh, gw = (
            axis_geometry(x2.shape[d], y2.shape[d], w2.shape[d], stride[i], dilation[i], radius[i])
            for i, d in enumerate((-2, -1))
        )
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # Where the patch grid does not shrink the map (maps no larger than a patch), x̃ would be
        # a new tensor as large as x: keep x itself (as vanilla does) and pool it in the backward.
        keep_x = need_w and gh.patches * gw.patches >= x2.shape[-2] * x2.shape[-1]
        ctx.fused = _fused_backward_applies(x2, w2, groups, gh, gw, keep_x, exact_gx)
        xt = x2 if keep_x else (patch_sum_input(x2, gh, gw) if need_w else None)
        ctx.pool_in_backward = keep_x
        ctx.channels_last = _dense_format(x2) is torch.channels_last
        # The weight itself is saved (it is alive anyway); W̃ is formed in the backward.
        ctx.save_for_backward(xt, weight if need_x else None)
        ctx.geometry = (gh, gw)
        ctx.meta = (groups, tuple(w2.shape), one_d, need_x, need_w, need_b)
        ctx.exact_gx = (tuple(x2.shape), stride, _explicit_padding(padding, w2.shape, dilation),
                        dilation) if exact_gx and need_x else None
        return y

    @staticmethod
    def backward(ctx, gy):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                "gradfilter: double backward (create_graph=True) through a filtered convolution "
                "is not supported; the filtered gradient is differentiated only once"
            )
        xt, weight = ctx.saved_tensors
        gh, gw = ctx.geometry
        if ctx.fused:
            return _native_backward(ctx, gy, xt, weight)
        if ctx.pool_in_backward:
            xt = patch_sum_input(xt, gh, gw)
        groups, w_shape, one_d, need_x, need_w, need_b = ctx.meta
        if one_d:
            gy = gy.unsqueeze(-2)
            weight = weight.unsqueeze(-2) if weight is not None else None
        sums, scale, gb = patch_mean_output(gy, gh, gw)
        if gh.stride * gw.stride != 1:
            scale = scale / (gh.stride * gw.stride)  # §1: the 1/(sh·sw) stride scale
        # input_grad="exact": the input gradient from the full gy, not from the patch means
        gx = None if ctx.exact_gx is None else _exact_input_grad(gy, weight, groups, *ctx.exact_gx)
        need_x = need_x and gx is None
        args = (sums, xt, weight, w_shape, groups, scale, need_w, need_x)
        if gh.keeps_taps or gw.keeps_taps:
            gw_, gxt = _tap_grads(*args, gh, gw)
        else:
            gw_, gxt = _pointwise_grads(*args)
        if need_w:
            gw_ = torch.empty(w_shape, dtype=gw_.dtype, device=gw_.device).copy_(
                gw_.reshape(_taps_shape(w_shape, gh, gw)).expand(w_shape)
            )
            if one_d:
                gw_ = gw_.squeeze(-2)
        if need_x:
            gx = unpool_input(gxt, gh, gw, ctx.channels_last)
        if gx is not None and one_d:
            gx = gx.squeeze(-2)
        return gx, gw_, (gb if need_b else None), None, None, None, None, None, None, None


_NATIVE_BACKWARD = True  # private switch for benchmarks/ab_switch.py


def _fused_backward_applies(x: Tensor, w: Tensor, groups: int, gh: AxisGeometry,
                            gw: AxisGeometry, keep_x: bool, exact_gx: bool) -> bool:
    """Whether the one-call native backward takes this conv: dense, taps summed, plain CPU maps,
    products below the oneDNN threshold (MKL GEMMs)."""
    if not _NATIVE_BACKWARD or groups != 1 or keep_x or exact_gx or gh.keeps_taps or gw.keeps_taps:
        return False
    if _dense_format(x) is not torch.contiguous_format or not native.applies(x):
        return False
    return not _onednn_sized(x.shape[0], gh.patches * gw.patches, w.shape[0], w.shape[1])


def _native_backward(ctx, gy: Tensor, xt: Tensor | None, weight: Tensor | None):
    """The backward of :class:`_FilteredConv` as one native call (see _fused_backward_applies)."""
    gh, gw = ctx.geometry
    groups, w_shape, one_d, need_x, need_w, need_b = ctx.meta
    if one_d:
        gy = gy.unsqueeze(-2)
        weight = weight.unsqueeze(-2) if weight is not None else None
    mean_scale = _patch_mean_scale(gy, gh, gw)  # as patch_mean_output, times the §1 stride scale
    scale_map = mean_scale if isinstance(mean_scale, Tensor) else None
    scale = (1.0 if scale_map is not None else mean_scale) / (gh.stride * gw.stride)
    empty = gy.new_empty(0)
    gx, gw_, gb = native.filtered_backward(
        gy, xt if need_w else empty, weight if need_x else empty, (w_shape[2], w_shape[3]),
        (gh.radius, gw.radius, gh.out_pad, gw.out_pad, gh.patches, gw.patches),
        (gh.in_patch, gw.in_patch, gh.in_pad, gw.in_pad), (gh.size, gw.size), scale, scale_map,
        need_x, need_w, _tiny_matrix(gh.size, gw.size, gh, gw, gy.dtype))
    if one_d:
        gx = gx.squeeze(-2) if need_x else gx
        gw_ = gw_.squeeze(-2) if need_w else gw_
    return (gx if need_x else None), (gw_ if need_w else None), (gb if need_b else None), \
        None, None, None, None, None, None, None


def _explicit_padding(padding, w_shape, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """(before, after) zero padding per axis of the 2-D view, for ``"same"``/``"valid"`` too."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":  # as F.conv2d: the odd extra element goes after
        totals = [dilation[i] * (w_shape[2 + i] - 1) for i in range(2)]
        return tuple((t // 2, t - t // 2) for t in totals)
    pad = (0, *padding) if len(padding) == 1 else tuple(padding)
    return tuple((p, p) for p in pad)


def _exact_input_grad(gy, weight, groups, x_shape, stride, pads, dilation) -> Tensor:
    """∂L/∂x of the plain convolution: the transposed conv of the full gy with the weight."""
    (t0, b0), (t1, b1) = pads
    if t0 == b0 and t1 == b1:
        return torch.nn.grad.conv2d_input(x_shape, weight, gy, stride, (t0, t1), dilation, groups)
    # asymmetric ('same' with an even span): the gradient of the padded input, cropped
    padded = (*x_shape[:2], x_shape[2] + t0 + b0, x_shape[3] + t1 + b1)
    gx = torch.nn.grad.conv2d_input(padded, weight, gy, stride, 0, dilation, groups)
    return gx[..., t0:t0 + x_shape[2], t1:t1 + x_shape[3]]


# ----------------------------------------------------------------------------------------------
# Public functional API


def _tuple(v: IntOrPair, n: int, name: str) -> tuple[int, ...]:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if len(t) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {v!r}")
    return t


def _needs_graph(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def validate_input_grad(input_grad: object) -> bool:
    """Check an ``input_grad`` mode; return True for ``"exact"``."""
    if input_grad not in INPUT_GRAD_MODES:
        raise ValueError(
            f"input_grad must be one of {', '.join(map(repr, INPUT_GRAD_MODES))}, "
            f"got {input_grad!r}"
        )
    return input_grad == "exact"


def _filtered(x, weight, bias, stride, padding, dilation, groups, radius, one_d: bool,
              input_grad: str = "filtered") -> Tensor:
    nd = 1 if one_d else 2
    name = "conv1d" if one_d else "conv2d"
    radius_t = validate_radius(radius, nd)
    exact_gx = validate_input_grad(input_grad)
    if x.dim() not in (nd + 1, nd + 2):
        raise ValueError(
            f"gradfilter.{name}: expected a {nd + 2}-D (batched) or {nd + 1}-D (unbatched) input, "
            f"got {x.dim()}-D with shape {tuple(x.shape)}"
        )
    stride_t = _tuple(stride, nd, "stride")
    dilation_t = _tuple(dilation, nd, "dilation")
    if not isinstance(padding, str):
        padding = _tuple(padding, nd, "padding")
    if one_d:
        radius_t, stride_t, dilation_t = (1, *radius_t), (1, *stride_t), (1, *dilation_t)
    kernel = (1, weight.shape[-1]) if one_d else tuple(weight.shape[-2:])
    for i in range(2):  # fail before any work if a dilation cannot be handled
        check_dilation(kernel[i], stride_t[i], dilation_t[i], radius_t[i])
    plain = F.conv1d if one_d else F.conv2d
    if not _needs_graph(x, weight, bias):
        return plain(x, weight, bias, stride_t[-nd:], padding, dilation_t[-nd:], groups)
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    device_type = x.device.type
    # autocast exists only for some device types (not 'meta', where shape-only runs go)
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # Convolutions run in the autocast dtype; cast as autocast would, then run unautocast so
        # the saved x̃ and the backward use that same dtype.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            y = _FilteredConv.apply(
                x, weight, bias, stride_t, padding, dilation_t, groups, radius_t, one_d, exact_gx
            )
    else:
        y = _FilteredConv.apply(
            x, weight, bias, stride_t, padding, dilation_t, groups, radius_t, one_d, exact_gx
        )
    return y.squeeze(0) if unbatched else y


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair | str = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    radius: IntOrPair = 4,
    input_grad: str = "filtered",
) -> Tensor:
    """``F.conv2d`` whose backward is gradient-filtered over ``radius``×``radius`` output patches.

    The output is bit-identical to ``F.conv2d``; under ``torch.no_grad()`` (or when nothing
    requires a gradient) it *is* ``F.conv2d`` and saves nothing. ``input_grad="exact"`` passes
    the exact input gradient down (see ``INPUT_GRAD_MODES``); the weight gradient stays filtered.
    """
    return _filtered(x, weight, bias, stride, padding, dilation, groups, radius, one_d=False,
                     input_grad=input_grad)


def conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair | str = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    radius: IntOrPair = 4,
    input_grad: str = "filtered",
) -> Tensor:
    """``F.conv1d`` whose backward is gradient-filtered over length-``radius`` output patches."""
    return _filtered(x, weight, bias, stride, padding, dilation, groups, radius, one_d=True,
                     input_grad=input_grad)


def filtered_saved_bytes(
    in_shape, out_shape, weight_shape, stride, dilation, radius, element_size: int = 4
) -> int:
    """Bytes of x̃, what the filtered conv saves besides the weight, from 2-D shapes alone."""
    gh, gw = (
        axis_geometry(in_shape[d], out_shape[d], weight_shape[d], stride[i], dilation[i], radius[i])
        for i, d in enumerate((-2, -1))
    )
    return in_shape[0] * in_shape[1] * gh.patches * gw.patches * element_size
