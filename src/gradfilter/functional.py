"""Gradient-filtered convolution: the op (docs/spec.md).

The forward is the plain convolution (bit-identical to ``F.conv2d``/``F.conv1d``) and saves only
the patch sums of the input, x̃ (:mod:`gradfilter.patches`); the weight is referenced, and its
tap sum W̃ formed in the backward. The backward replaces the output gradient by its mean over
r×r patches, which turns the convolution backward into small matrix products at patch
resolution (here, or one native call on the CPU) followed by a repetition of the input gradient
over each input patch. Patch grids are :mod:`gradfilter.geometry`'s.

Everything is computed in 2-D; a 1-D convolution is a 2-D one with a height of one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native, traceable
from .geometry import (
    INPUT_GRAD_MODES,
    AxisGeometry,
    IntOrPair,
    UnsupportedDilationError,
    axis_geometry,
    check_dilation,
    conv_args,
    explicit_padding,
    filtered_saved_bytes,
    validate_input_grad,
    validate_radius,
)
from .patches import (
    dense_format,
    kernel_sum,
    patch_mean_output,
    patch_mean_scale,
    patch_sum_input,
    summed_kernel,
    tiny_matrix,
    unpool_input,
)

__all__ = [
    "INPUT_GRAD_MODES",
    "AxisGeometry",
    "UnsupportedDilationError",
    "axis_geometry",
    "check_dilation",
    "conv1d",
    "conv2d",
    "filtered_saved_bytes",
    "validate_input_grad",
    "validate_radius",
]


# From this many multiply-adds per product, CPU patch products run in oneDNN's 1×1 conv backward
# (both in one call) instead of MKL GEMMs: 1.7–2.0× faster alone on the per-layer benchmark's
# products of ≥ 100M. Below it oneDNN can win alone yet loses inside a backward: the one-call
# native backward with MKL GEMMs is 1.05–1.2× faster at 26M, and on ResNet18 and MobileNetV2 at
# r=4 (≤ 17M) oneDNN cost ~1 ms per step.
_ONEDNN_MACS = 64_000_000


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
    fmt = torch.channels_last if dense_format(gbar) is torch.channels_last \
        else torch.contiguous_format
    gbar = gbar.contiguous(memory_format=fmt)
    w_t = (kernel_sum(weight).to(gbar.dtype) * scale).reshape(cout, cin, 1, 1) if need_x \
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
    if not depthwise and groups == 1 and gbar.device.type == "cpu" and (
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
        w_t = kernel_sum(weight).to(gbar.dtype) * scale  # W̃ · scale (a new tensor)
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
    """Taps kept on an axis (atrous, docs/spec.md §6): the conv at patch resolution, dilation
    d/(r·s)."""
    taps = _taps_shape(w_shape, gh, gw)
    pad, dil = _patch_conv_args(taps, gh, gw)
    gbar = gbar * scale  # scale: a float, or a (Ph, Pw) map of 1/(real pixels per patch)
    gw_ = gxt = None
    if need_w:
        gw_ = torch.nn.grad.conv2d_weight(xt.to(gbar.dtype), taps, gbar, 1, pad, dil, groups)
    if need_x:
        n, _, ph, pw = gbar.shape
        wsum = summed_kernel(weight, gh, gw).to(gbar.dtype)
        gxt = torch.nn.grad.conv2d_input(
            (n, w_shape[1] * groups, ph, pw), wsum, gbar, 1, pad, dil, groups
        )
    return gw_, gxt


# ----------------------------------------------------------------------------------------------
# The autograd Function


class _FilteredConv(torch.autograd.Function):
    """conv forward; gradient-filtered backward (docs/spec.md §4). Works on 2-D views of 1-D
    convs."""

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
        ctx.channels_last = dense_format(x2) is torch.channels_last
        # The weight itself is saved (it is alive anyway); W̃ is formed in the backward.
        ctx.save_for_backward(xt, weight if need_x else None)
        ctx.geometry = (gh, gw)
        ctx.meta = (groups, tuple(w2.shape), one_d, need_x, need_w, need_b)
        ctx.exact_gx = (tuple(x2.shape), stride, explicit_padding(padding, w2.shape[2:], dilation),
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
            scale = scale / (gh.stride * gw.stride)  # docs/spec.md §5: the stride scale
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


def _fused_backward_applies(x: Tensor, w: Tensor, groups: int, gh: AxisGeometry,
                            gw: AxisGeometry, keep_x: bool, exact_gx: bool) -> bool:
    """Whether the one-call native backward takes this conv: dense, taps summed, plain CPU maps,
    products below the oneDNN threshold (MKL GEMMs)."""
    if groups != 1 or keep_x or exact_gx or gh.keeps_taps or gw.keeps_taps:
        return False
    if dense_format(x) is not torch.contiguous_format or not native.applies(x):
        return False
    return not _onednn_sized(x.shape[0], gh.patches * gw.patches, w.shape[0], w.shape[1])


def _native_backward(ctx, gy: Tensor, xt: Tensor | None, weight: Tensor | None):
    """The backward of :class:`_FilteredConv` as one native call (see _fused_backward_applies)."""
    gh, gw = ctx.geometry
    groups, w_shape, one_d, need_x, need_w, need_b = ctx.meta
    if one_d:
        gy = gy.unsqueeze(-2)
        weight = weight.unsqueeze(-2) if weight is not None else None
    mean_scale = patch_mean_scale(gy, gh, gw)  # as patch_mean_output, times the §5 stride scale
    scale_map = mean_scale if isinstance(mean_scale, Tensor) else None
    scale = (1.0 if scale_map is not None else mean_scale) / (gh.stride * gw.stride)
    empty = gy.new_empty(0)
    gx, gw_, gb = native.filtered_backward(
        gy, xt if need_w else empty, weight if need_x else empty, (w_shape[2], w_shape[3]),
        (gh.radius, gw.radius, gh.out_pad, gw.out_pad, gh.patches, gw.patches),
        (gh.in_patch, gw.in_patch, gh.in_pad, gw.in_pad), (gh.size, gw.size), scale, scale_map,
        need_x, need_w, tiny_matrix(gh.size, gw.size, gh, gw, gy.dtype))
    if one_d:
        gx = gx.squeeze(-2) if need_x else gx
        gw_ = gw_.squeeze(-2) if need_w else gw_
    return (gx if need_x else None), (gw_ if need_w else None), (gb if need_b else None), \
        None, None, None, None, None, None, None


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


def _needs_graph(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _filtered(x, weight, bias, stride, padding, dilation, groups, radius, one_d: bool,
              input_grad: str = "filtered") -> Tensor:
    args = conv_args(x.shape, weight.shape, stride, padding, dilation, radius, input_grad, one_d,
                     f"gradfilter.{'conv1d' if one_d else 'conv2d'}")
    # torch.compile / torch.export trace ATen ops: the autograd.Function below (and its native
    # kernels) does not survive them, the stop-gradient form does (same output and gradients)
    if traceable.tracing():
        return traceable.filtered(x, weight, bias, args, groups, one_d)
    nd = 1 if one_d else 2
    padding, exact_gx = args.padding, args.exact_gx
    stride_t, dilation_t, radius_t = args.stride2, args.dilation2, args.radius2
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
