"""The fast filtered conv against the float64 spec of docs/spec.md §4 (tests/spec.py), and
oracles."""

import math

import pytest
import torch
import torch.nn.functional as F
from cases import draw_channels
from conftest import native_buildable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spec import filtered_grads, patch_tensors

import gradfilter as gf
from gradfilter import native


@st.composite
def conv_cases(draw):
    groups, cin, cout = draw_channels(draw)
    k = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from([0, 1, "same"] if stride == 1 else [0, 1]))
    radius = draw(st.integers(1, 5))
    span = dilation * (k - 1) + 1
    h = draw(st.integers(max(span, 1), 12))
    w = draw(st.integers(max(span, 1), 12))
    n = draw(st.integers(1, 4))
    return dict(n=n, cin=cin, cout=cout, groups=groups, k=k, stride=stride, dilation=dilation,
                padding=padding, radius=radius, h=h, w=w)


def _run_fast(c, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=g, dtype=dtype)
    w = torch.randn(c["cout"], c["cin"] // c["groups"], c["k"], c["k"], generator=g, dtype=dtype)
    b = torch.randn(c["cout"], generator=g, dtype=dtype)
    x, w, b = (t.to(device).requires_grad_() for t in (x, w, b))
    y = gf.conv2d(x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"], c["radius"])
    gy = torch.randn(y.shape, generator=g, dtype=dtype).to(device)
    y.backward(gy)
    return x, w, b, y, gy


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "pytorch"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=conv_cases())
def test_matches_float64_spec(use_native, c):
    if use_native and not native_buildable():
        pytest.skip("native kernels cannot be built here")
    with native.use_native(use_native):
        x, w, b, y, gy = _run_fast(c)
    gx, gw, gb = filtered_grads(x.detach(), w.detach(), gy, (c["stride"],) * 2,
                                (c["dilation"],) * 2, c["groups"], (c["radius"],) * 2)
    torch.testing.assert_close(x.grad, gx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w.grad, gw, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.grad, gb, rtol=1e-9, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_cuda_matches_float64_spec(c):
    """The same spec check with the op running on the GPU (float64 there too)."""
    x, w, b, y, gy = _run_fast(c, device="cuda")
    gx, gw, gb = filtered_grads(x.detach().cpu(), w.detach().cpu(), gy.cpu(),
                                (c["stride"],) * 2, (c["dilation"],) * 2, c["groups"],
                                (c["radius"],) * 2)
    torch.testing.assert_close(x.grad.cpu(), gx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w.grad.cpu(), gw, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.grad.cpu(), gb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rh,rw,sh,sw", [(2, 3, 1, 2), (3, 1, 2, 1)])
def test_anisotropic_radius_and_stride(rh, rw, sh, sw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 11, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = gf.conv2d(x, w, None, (sh, sw), 1, 1, 1, radius=(rh, rw))
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    gx, gw, _ = filtered_grads(x.detach(), w.detach(), gy, (sh, sw), (1, 1), 1, (rh, rw))
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(w.grad, gw)


@pytest.mark.parametrize("dilation,radius", [(2, 2), (4, 2), (4, 4), (6, 3), (2, 1)])
def test_atrous_keeps_taps(dilation, radius):
    """docs/spec.md §6: d >= r keeps each tap at its own patch offset."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 16, 14, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = gf.conv2d(x, w, None, 1, dilation, dilation, 1, radius=radius)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    gx, gw, _ = filtered_grads(x.detach(), w.detach(), gy, (1, 1), (dilation,) * 2, 1,
                               (radius,) * 2)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(w.grad, gw)
    # Taps are not summed away: the nine taps get different gradients.
    assert w.grad[0, 0].flatten().unique().numel() > 1


def test_conv1d_matches_spec_on_height_one():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 23, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = gf.conv1d(x, w, None, stride=2, padding=2, dilation=1, groups=2, radius=3)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    gx, gw, _ = filtered_grads(x.detach().unsqueeze(2), w.detach().unsqueeze(2),
                               gy.unsqueeze(2), (1, 2), (1, 1), 2, (1, 3))
    torch.testing.assert_close(x.grad, gx.squeeze(2))
    torch.testing.assert_close(w.grad, gw.squeeze(2))


# ---------------------------------------------------------------------------------------------
# DC oracle: constant x and gy per channel -> filtered == exact autograd (docs/spec.md §11)


def _cell_mean(t, s):
    n, c, h, w = t.shape
    return t[..., : h // s * s, : w // s * s].reshape(n, c, h // s, s, w // s, s).mean((3, 5))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups,cin,cout", [(1, 3, 4), (2, 4, 6), (4, 4, 4)])
@pytest.mark.parametrize("radius", [1, 2, 3, 4])
@pytest.mark.parametrize("k,dilation", [(3, 1), (1, 1), (5, 1), (3, 2)])
def test_dc_oracle(stride, groups, cin, cout, radius, k, dilation):
    """Ho divisible by r, and every tap sees the same pixels in both: gW is exact, and gx is exact
    in the interior once averaged over the stride's s×s cells.

    Summed taps (docs/spec.md §4.2): a 'valid' conv whose input patch grid lies on real pixels.
    Kept taps (docs/spec.md §6, d >= r·s): a 'same' conv whose grid is the image; shifted taps see
    zeros
    outside it, as the exact conv's padding does.
    """
    span = dilation * (k - 1) + 1
    ho = radius * math.ceil(16 / radius)
    keeps_taps = k > 1 and dilation > 1 and dilation >= radius * stride
    if keeps_taps:
        padding, h = dilation * (k - 1) // 2, ho * stride
    else:
        padding, h = 0, ho * stride + span - 1
    torch.manual_seed(0)
    xc = torch.randn(1, cin, 1, 1, dtype=torch.float64)
    gc = torch.randn(1, cout, 1, 1, dtype=torch.float64)
    x = xc.expand(2, cin, h, h).clone()
    w = torch.randn(cout, cin // groups, k, k, dtype=torch.float64)

    def grads(fn):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww)
        y.backward(gc.expand_as(y))
        return xx.grad, ww.grad

    ex_gx, ex_gw = grads(lambda a, b: F.conv2d(a, b, None, stride, padding, dilation, groups))
    fi_gx, fi_gw = grads(
        lambda a, b: gf.conv2d(a, b, None, stride, padding, dilation, groups, radius)
    )
    assert fi_gx.shape == x.shape
    torch.testing.assert_close(fi_gw, ex_gw, rtol=1e-10, atol=1e-10)
    margin = math.ceil(max(span, radius * stride) / stride) + 1
    ex, fi = _cell_mean(ex_gx, stride), _cell_mean(fi_gx, stride)
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
    assert ex[inner].numel() > 0
    torch.testing.assert_close(fi[inner], ex[inner], rtol=1e-10, atol=1e-10)


def test_one_by_one_radius_one_is_exact():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 4, 7, 9, dtype=torch.float64)
    exact = torch.autograd.grad(F.conv2d(x, w, b), (x, w, b), gy)
    filt = torch.autograd.grad(gf.conv2d(x, w, b, radius=1), (x, w, b), gy)
    for e, f in zip(exact, filt):
        torch.testing.assert_close(f, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride,padding,radius", [(1, 1, 4), (2, 1, 2), (1, 0, 3), (2, 0, 5)])
def test_bias_gradient_is_exact(stride, padding, radius):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 10, requires_grad=True)
    w = torch.randn(5, 3, 3, 3)
    b = torch.randn(5, requires_grad=True)
    y = gf.conv2d(x, w, b, stride, padding, radius=radius)
    gy = torch.randn_like(y)
    (gb,) = torch.autograd.grad(y, b, gy)
    (ex,) = torch.autograd.grad(F.conv2d(x, w, b, stride, padding), b, gy)
    torch.testing.assert_close(gb, ex, rtol=1e-5, atol=1e-5)


def test_radius_larger_than_map_is_one_patch():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = gf.conv2d(x, w, None, 1, 1, radius=16)
    gy = torch.randn_like(y)
    y.backward(gy)
    # One patch: ḡ is the global mean, so gx is one constant per (n, c) over the whole map.
    assert torch.allclose(x.grad, x.grad[..., :1, :1].expand_as(x.grad))
    expect = torch.einsum("oi,no->ni", w.detach().sum((2, 3)), gy.mean((2, 3)))
    torch.testing.assert_close(x.grad[..., 0, 0], expect)


def _wide_oracle(x, w, gy, r):
    """docs/spec.md §4 for a stride-1, 'same'-size conv with summed taps, in float64: the spec's
    patch loops
    for ḡ and x̃, einsum for the products (its per-channel loops are too slow at 256 channels)."""
    h, wd = x.shape[-2:]
    gbar, xt = patch_tensors(x, gy, (1, 1), (r, r))
    ph, pw = gbar.shape[-2:]
    top, left = -(-(ph * r - h) // 2), -(-(pw * r - wd) // 2)
    gw = torch.einsum("noij,ncij->oc", gbar, xt)[:, :, None, None].expand(w.shape)
    gxt = torch.einsum("oc,noij->ncij", w.sum((2, 3)), gbar)
    rows = (torch.arange(h) + top) // r
    cols = (torch.arange(wd) + left) // r
    return gxt[:, :, rows][:, :, :, cols], gw


@pytest.mark.parametrize("hw", [(7, 9), (8, 8)])  # a grid that overhangs the map, one that tiles
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("cin,cout", [(256, 256), (256, 320)])
def test_wide_channels_on_few_patches_match_spec(x_grad, cin, cout, hw):
    """≥ 256 channels each way on few patches per sample (the GEMM layouts of wide convs)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cin, *hw, generator=g, dtype=torch.float64).requires_grad_(x_grad)
    w = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = gf.conv2d(x, w, None, 1, 1, 1, 1, 4)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    gx, gw = _wide_oracle(x.detach(), w.detach(), gy, 4)
    torch.testing.assert_close(w.grad, gw, rtol=1e-9, atol=1e-9)
    if x_grad:
        torch.testing.assert_close(x.grad, gx, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("hw,r", [((7, 9), 4), ((64, 66), 2)])
@pytest.mark.parametrize("layout", ["plain", "channels_last"])
@pytest.mark.parametrize("products", ["onednn", "mkl"])
def test_float32_cpu_products_match_spec(monkeypatch, x_grad, hw, r, layout, products):
    """float32 on the CPU: patch products in oneDNN or MKL by size (float64 runs neither)."""
    from gradfilter import functional

    monkeypatch.setattr(functional, "_ONEDNN_MACS", 0 if products == "onednn" else 1 << 62)
    g = torch.Generator().manual_seed(6)
    x64 = torch.randn(2, 24, *hw, generator=g, dtype=torch.float64)
    w64 = torch.randn(40, 24, 3, 3, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x64.float().contiguous(memory_format=fmt).requires_grad_(x_grad)
    w = w64.float().requires_grad_()
    y = gf.conv2d(x, w, None, 1, 1, 1, 1, r)
    gy64 = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy64.float().contiguous(memory_format=fmt))  # gy in the model's layout
    gx, gw = _wide_oracle(x64, w64, gy64, r)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-4, atol=1e-3)
    if x_grad:
        torch.testing.assert_close(x.grad.double(), gx, rtol=1e-4, atol=1e-4)


def test_wide_oracle_agrees_with_the_spec_on_small_channels():
    """The shortcut oracle above is itself checked against spec.py where that is cheap."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, 9, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64)
    gx, gw = _wide_oracle(x, w, gy, 4)
    sx, sw, _ = filtered_grads(x, w, gy, (1, 1), (1, 1), 1, (4, 4))
    torch.testing.assert_close(gx, sx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, sw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gy_layout", [torch.channels_last, torch.contiguous_format],
                         ids=["gy_cl", "gy_plain"])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "pytorch"])
@pytest.mark.parametrize("stride,radius,hw", [(1, 4, (7, 7)), (1, 2, (13, 10)), (2, 2, (12, 9))])
def test_channels_last_input_matches_spec(use_native, stride, radius, hw, gy_layout):
    """A channels-last model: same gradients as the spec; gx keeps the layout on the native path."""
    if use_native and not native_buildable():
        pytest.skip("native kernels cannot be built here")
    g = torch.Generator().manual_seed(5)
    cl = torch.channels_last
    x = torch.randn(2, 6, *hw, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    w = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    x.requires_grad_()
    w.requires_grad_()
    with native.use_native(use_native):
        y = gf.conv2d(x, w, None, stride, 1, 1, 1, radius)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        # autograd.grad returns gx as the op made it (.grad would be re-laid-out like x)
        got_x, got_w = torch.autograd.grad(y, (x, w), gy.contiguous(memory_format=gy_layout))
    gx, gw, _ = filtered_grads(x.detach(), w.detach(), gy, (stride,) * 2, (1, 1), 1,
                               (radius,) * 2)
    torch.testing.assert_close(got_x, gx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_w, gw, rtol=1e-9, atol=1e-9)
    if use_native:
        assert got_x.is_contiguous(memory_format=cl)
