"""The filtered convolution in stop-gradient form: plain differentiable ATen ops only.

``torch.compile`` and ``torch.export`` trace ATen ops. The op of :mod:`gradfilter.functional` is
an ``autograd.Function`` over native kernels without fake kernels: compiling it fails, and export
inlines its forward and drops its backward (the exported module then gives vanilla gradients, or
none). Here the same backward (docs/spec.md) comes out of *ordinary* autograd:

    y = conv(x, W, b).detach() + crop(up(d)),    d = (z − z.detach()) · inv_count / (sh·sw),
    z = conv(x̃, W̃)  at patch resolution,

with x̃ the sums of x over the input patches and W̃ the tap-summed weight (taps kept on an axis
where the dilation is at least r·s: z is then the 'same' conv of dilation d/(r·s)). ``d`` is
exactly zero, so y is ``F.conv2d``'s output; ``crop∘up`` is nearest repetition onto the output
grid, whose adjoint is the patch sum over real pixels, so ∂L/∂z = ḡ (the patch mean of gy) and
autograd's conv backward at patch resolution gives gW = Σ ḡ·x̃ /(sh·sw) on every tap and
x̃'s gradient W̃ᵀḡ /(sh·sw), repeated over each input patch by the adjoint of the patch sum. The
bias gradient Σ gy is exact. The only tensors saved are x̃, W̃ and patch-resolution constants.

:func:`batch_norm_eval` is :func:`gradfilter.lean.batch_norm_eval` in the same form. The
modules of :mod:`gradfilter.nn` and :mod:`gradfilter.lean` switch to these functions while
:func:`tracing` (compile or export); eager runs keep the fast op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import AxisGeometry, ConvArgs, IntOrPair, axis_geometry, conv_args, explicit_padding

__all__ = ["batch_norm_eval", "conv1d", "conv2d", "filtered", "tracing"]


def tracing() -> bool:
    """Whether torch.compile (dynamo) or torch.export (strict or not) is tracing this call.

    On torch 2.14: dynamo sets ``is_compiling``; strict export sets ``is_compiling`` and
    ``is_exporting``; non-strict export sets both too (dynamo's own flag stays off). The check
    is constant-folded by dynamo (no graph break).
    """
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _wants_grad(t: Tensor | None) -> bool:
    """Whether to build ``t``'s gradient terms. Eager runs and torch.compile (whose guards
    recompile when ``requires_grad`` or the grad mode change) build only what is needed now; an
    exported graph must serve whatever requires grad when it runs (export's example input does
    not, yet the caller's input may), so export builds every term."""
    if t is None:
        return False
    return torch.compiler.is_exporting() or (torch.is_grad_enabled() and t.requires_grad)


# ----------------------------------------------------------------------------------------------
# Patch grids as differentiable view/pad/sum ops (their adjoints are the repetition and the sum)


def _fit(t: Tensor, dim: int, before: int, after: int) -> Tensor:
    """``t`` along ``dim`` with ``before``/``after`` entries added (zeros) or removed (< 0)."""
    if before < 0:
        t = t.narrow(dim, -before, t.shape[dim] + before)
        before = 0
    if after < 0:
        t = t.narrow(dim, 0, t.shape[dim] + after)
        after = 0
    if before or after:
        t = F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [before, after])
    return t


def _axis_sum(t: Tensor, dim: int, pad: int, patches: int, k: int) -> Tensor:
    """Sums of ``t`` over ``patches`` patches of ``k`` along ``dim``, the grid starting ``pad``
    entries before index 0 (negative: inside the map; entries off the grid are dropped)."""
    t = _fit(t, dim, pad, patches * k - t.shape[dim] - pad)
    return t if k == 1 else t.unflatten(dim, (patches, k)).sum(dim + 1)


def _axis_repeat(t: Tensor, dim: int, pad: int, k: int, size: int) -> Tensor:
    """Each entry of ``t`` along ``dim`` repeated ``k`` times, then the ``size`` entries from
    ``pad`` on (the adjoint of :func:`_axis_sum` on a map of that size)."""
    if k > 1:
        shape = list(t.shape)
        t = t.unsqueeze(dim + 1).expand(*shape[: dim + 1], k, *shape[dim + 1:])
        t = t.flatten(dim, dim + 1)
    return _fit(t, dim, -pad, size - t.shape[dim] + pad)


def _inverse_counts(gh: AxisGeometry, gw: AxisGeometry, like: Tensor) -> Tensor:
    """(Ph, Pw): 1 / (real output pixels in each patch), from the sums of ones on the grid."""
    ones_h = like.new_ones(gh.out_size)
    ones_w = like.new_ones(gw.out_size)
    ch = _axis_sum(ones_h, 0, gh.out_pad, gh.patches, gh.radius)
    cw = _axis_sum(ones_w, 0, gw.out_pad, gw.patches, gw.radius)
    return torch.outer(ch, cw).reciprocal()


# ----------------------------------------------------------------------------------------------
# The filtered convolution


def _input_path(x: Tensor, weight: Tensor, stride, pads, dilation, groups, out_hw) -> Tensor:
    """A zero whose gradient w.r.t. x is the plain conv's input gradient (input_grad="exact").

    ``conv(x, W.detach())`` would save x (ATen's conv saves its input whatever it
    differentiates); im2col (which saves nothing) and a product with the detached weight
    (which saves only the weight) give the same linear map. Its forward is spent (k² × x
    transiently), its backward is the transposed conv.
    """
    (t0, b0), (t1, b1) = pads
    if (t0, t1) != (b0, b1):
        x, pad = F.pad(x, (t1, b1, t0, b0)), (0, 0)
    else:
        pad = (t0, t1)
    w = weight.detach()
    cout, cpg, kh, kw = w.shape
    n = x.shape[0]
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=pad, stride=stride)  # N, Cin·k², L
    k, length = cpg * kh * kw, cols.shape[-1]
    if groups == 1:
        v = torch.matmul(w.reshape(cout, k), cols)  # N, Cout, L
    else:
        cols = cols.view(n, groups, k, length).permute(1, 2, 0, 3).reshape(groups, k, n * length)
        v = torch.bmm(w.reshape(groups, cout // groups, k), cols)
        v = v.view(groups, cout // groups, n, length).permute(2, 0, 1, 3)
    v = v.reshape(n, cout, *out_hw)
    return v - v.detach()


class _Attached(torch.autograd.Function):
    """``y`` unchanged; the gradient reaching ``d`` is the sum of y's over each patch of the
    ``grid`` (per spatial axis: pad before the grid, patches, patch length), the adjoint of
    repeating d over the patches. What ``y + crop(up(d))`` computes with d = 0, without the
    full-resolution add: fused into the next elementwise kernel, torch.compile's code indexes
    d by ``h // r`` there and loses its vector loops (on CPUs), costing more than the filtered
    backward saves."""

    @staticmethod
    def forward(y: Tensor, d: Tensor, grid: tuple[tuple[int, int, int], ...]) -> Tensor:
        return y.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.grid = inputs[2]

    @staticmethod
    def backward(ctx, g: Tensor):
        gd = g
        for i, (pad, patches, k) in enumerate(ctx.grid):
            gd = _axis_sum(gd, 2 + i, pad, patches, k)
        return g, gd, None


def _attach(y: Tensor, d: Tensor, grid: tuple[tuple[int, int, int], ...]) -> Tensor:
    """``y + crop(up(d))`` for a zero ``d`` on a patch ``grid`` of y's spatial axes (see
    :class:`_Attached`): its value is y's; its gradient w.r.t. d the patch sums of the output's.
    torch.compile gets :class:`_Attached`; export (whose programs carry plain ATen ops to other
    runtimes) the repetition and the add."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _Attached.apply(y, d, grid)
    for i, (pad, _, k) in enumerate(grid):
        d = _axis_repeat(d, 2 + i, pad, k, y.shape[2 + i])
    return y + d


def _filtered_2d(x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, stride, padding,
                 dilation, groups: int, radius, exact: bool) -> Tensor:
    """y (the plain conv's output, no graph) plus the zero-valued terms that carry the filtered
    gradients; 2-D, batched."""
    gh, gw = (
        axis_geometry(x.shape[d], y.shape[d], weight.shape[d], stride[i], dilation[i], radius[i])
        for i, d in enumerate((2, 3))
    )
    out = y
    need_x = _wants_grad(x)
    # the patch-resolution conv carries gW, and gx unless that is exact
    x_w = x.detach() if exact else x
    if _wants_grad(weight) or (need_x and not exact):
        xt = _axis_sum(x_w, 2, gh.in_pad, gh.patches, gh.in_patch)
        xt = _axis_sum(xt, 3, gw.in_pad, gw.patches, gw.in_patch)
        summed = [d for d, g in ((2, gh), (3, gw)) if not g.keeps_taps and weight.shape[d] > 1]
        wt = weight.sum(summed, keepdim=True) if summed else weight
        dil = (max(gh.tap_dilation, 1), max(gw.tap_dilation, 1))
        pad = ((wt.shape[2] - 1) * dil[0] // 2, (wt.shape[3] - 1) * dil[1] // 2)
        z = F.conv2d(xt, wt, None, 1, pad, dil, groups)
        scale = _inverse_counts(gh, gw, z)
        if gh.stride * gw.stride != 1:
            scale = scale / (gh.stride * gw.stride)
        d = (z - z.detach()) * scale
    else:
        d = None
    if _wants_grad(bias):  # gb = Σ gy: a constant on every patch
        db = (bias - bias.detach()).view(1, -1, 1, 1)
        d = db.expand(y.shape[0], -1, gh.patches, gw.patches) if d is None else d + db
    if d is not None:
        grid = tuple((g.out_pad, g.patches, g.radius) for g in (gh, gw))
        out = _attach(out, d, grid)
    if exact and need_x:
        out = out + _input_path(x, weight, stride, explicit_padding(padding, weight.shape[2:],
                                                                  dilation),
                                dilation, groups, y.shape[2:])
    return out


def filtered(x: Tensor, weight: Tensor, bias: Tensor | None, args: ConvArgs, groups: int,
             one_d: bool) -> Tensor:
    """The filtered conv of checked arguments (:func:`gradfilter.geometry.conv_args`): what
    :func:`conv2d` / :func:`conv1d` and, while tracing, :func:`gradfilter.conv2d` run."""
    nd = 1 if one_d else 2
    stride_t, dilation_t, padding, exact = args.stride, args.dilation, args.padding, args.exact_gx
    s2, d2, r2 = args.stride2, args.dilation2, args.radius2
    plain = F.conv1d if one_d else F.conv2d
    if not any(_wants_grad(t) for t in (x, weight, bias)):
        return plain(x, weight, bias, stride_t, padding, dilation_t, groups)
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)  # cast as autocast would, as the op does
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    y = plain(x.detach(), weight.detach(), None if bias is None else bias.detach(), stride_t,
              padding, dilation_t, groups)
    if one_d:
        pad2 = padding if isinstance(padding, str) else (0, *padding)
        out = _filtered_2d(x.unsqueeze(2), weight.unsqueeze(2), bias, y.unsqueeze(2), s2, pad2,
                           d2, groups, r2, exact).squeeze(2)
    else:
        out = _filtered_2d(x, weight, bias, y, s2, padding, d2, groups, r2, exact)
    return out.squeeze(0) if unbatched else out


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
    """:func:`gradfilter.conv2d` in stop-gradient form: same arguments, same output (bit for
    bit ``F.conv2d``'s), same gradients (docs/spec.md) from plain autograd, so that
    ``torch.compile`` and ``torch.export`` can trace it. Saves x̃ and W̃ (and, with
    ``input_grad="exact"``, the weight), not x."""
    args = conv_args(x.shape, weight.shape, stride, padding, dilation, radius, input_grad,
                     False, "gradfilter.traceable.conv2d")
    return filtered(x, weight, bias, args, groups, one_d=False)


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
    """:func:`gradfilter.conv1d` in stop-gradient form (a 2-D conv of height 1, radius 1 on
    that axis): traceable, same output and gradients."""
    args = conv_args(x.shape, weight.shape, stride, padding, dilation, radius, input_grad, True,
                     "gradfilter.traceable.conv1d")
    return filtered(x, weight, bias, args, groups, one_d=True)


# ----------------------------------------------------------------------------------------------
# Lean eval-mode BatchNorm


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor,
                    weight: Tensor | None, bias: Tensor | None, eps: float,
                    radius: int | None = None) -> Tensor:
    """:func:`gradfilter.lean.batch_norm_eval` in stop-gradient form (traceable).

    The output is ``F.batch_norm(..., training=False)``'s; zero-valued terms carry the
    gradients: gx = g·γ/σ (saves the C scales only), gb = Σ g, and for a weight that trains
    gγ = Σ g·(x − μ)/σ (``radius=None``: x normalised is saved) or its patch form
    Σ_P (Σ_P g)·(x̄_P − μ)/σ over ``radius`` patches anchored at index 0 (``radius=r``: only
    the patch means are saved).
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = F.batch_norm(x.detach(), running_mean, running_var, _detach(weight), _detach(bias),
                       False, 0.0, eps)
    if not any(_wants_grad(t) for t in (x, weight, bias)):
        return out
    inv_std = torch.rsqrt(running_var + eps)
    if _wants_grad(x):
        scale = inv_std if weight is None else weight.detach() * inv_std
        out = out + (x - x.detach()) * scale.view(shape)
    if _wants_grad(bias):
        out = out + (bias - bias.detach()).view(shape)
    if _wants_grad(weight):
        dw = (weight - weight.detach()).view(shape)
        mean, inv_std = running_mean.view(shape), inv_std.view(shape)
        if radius is None:
            out = out + (x.detach() - mean) * inv_std * dw
        else:
            spatial = x.shape[2:]
            xs, counts = x.detach(), x.new_ones(spatial)
            for i, size in enumerate(spatial):
                patches = -(-size // radius)
                xs = _axis_sum(xs, 2 + i, 0, patches, radius)
                counts = _axis_sum(counts, i, 0, patches, radius)
            t = (xs / counts - mean) * inv_std * dw
            out = _attach(out, t, tuple((0, -(-size // radius), radius) for size in spatial))
    return out
