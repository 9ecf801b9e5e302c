"""Forward identity, saved memory, modules, dtypes, autocast, compile and error handling."""

import pytest
import torch
import torch.nn.functional as F
from spec import filtered_grads
from torch import nn

import gradfilter as gf

CASES_2D = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=1, padding="same", dilation=2, groups=2),
    dict(stride=2, padding=(0, 2), dilation=1, groups=6),
    dict(stride=1, padding="valid", dilation=1, groups=3),
]


@pytest.mark.parametrize("case", CASES_2D)
@pytest.mark.parametrize("radius", [1, 2, 4, 7])
def test_forward_bit_identical_2d(case, radius, device):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 17, 14, device=device, requires_grad=True)
    w = torch.randn(12, 6 // case["groups"], 3, 3, device=device, requires_grad=True)
    b = torch.randn(12, device=device, requires_grad=True)
    y = gf.conv2d(x, w, b, radius=radius, **case)
    assert y.grad_fn is not None
    assert torch.equal(y, F.conv2d(x, w, b, **case))


@pytest.mark.parametrize("stride,padding,dilation", [(1, 2, 1), (2, 0, 1), (1, "same", 3)])
def test_forward_bit_identical_1d(stride, padding, dilation, device):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 31, device=device, requires_grad=True)
    w = torch.randn(8, 4, 5, device=device, requires_grad=True)
    y = gf.conv1d(x, w, None, stride, padding, dilation, radius=3)
    assert torch.equal(y, F.conv1d(x, w, None, stride, padding, dilation))
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_unbatched_input():
    x = torch.randn(3, 10, 10, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = gf.conv2d(x, w, padding=1, radius=2)
    assert torch.equal(y, F.conv2d(x, w, padding=1))
    y.sum().backward()
    assert x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------
# What is saved for backward


def _saved(fn, params):
    with gf.count_saved(params) as saved:
        y = fn()
    return saved, y


@pytest.mark.parametrize("radius,stride", [(2, 1), (4, 1), (4, 2), (3, 1)])
def test_saves_only_patch_sums(radius, stride):
    x = torch.randn(4, 16, 30, 40, requires_grad=True)
    conv = gf.FilteredConv2d(16, 32, 3, stride=stride, padding=1, radius=radius)
    saved, y = _saved(lambda: conv(x), conv.parameters())
    ho, wo = y.shape[-2:]
    ph, pw = -(-ho // radius), -(-wo // radius)
    assert saved.bytes == 4 * 16 * ph * pw * 4  # x̃ only; the weight is excluded as a parameter
    plain = nn.Conv2d(16, 32, 3, stride=stride, padding=1)
    vanilla, _ = _saved(lambda: plain(x), plain.parameters())
    assert vanilla.bytes == x.numel() * 4
    assert saved.bytes < vanilla.bytes / (radius * stride) ** 2 * 1.3


def test_nothing_saved_without_grad():
    x = torch.randn(2, 3, 8, 8)
    conv = gf.FilteredConv2d(3, 4, 3, padding=1, radius=2)
    with torch.no_grad():
        saved, y = _saved(lambda: conv(x), ())
    assert saved.count == 0 and y.grad_fn is None
    conv.requires_grad_(False)
    saved, y = _saved(lambda: conv(x), ())
    assert saved.count == 0 and y.grad_fn is None


def test_frozen_weight_saves_no_patch_sums():
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    conv = gf.FilteredConv2d(8, 8, 3, padding=1, radius=2).requires_grad_(False)
    saved, y = _saved(lambda: conv(x), conv.parameters())
    assert saved.bytes == 0  # only the (excluded) weight is needed for gx
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is None


# ------------------------------------------------------------------------------------------------
# Modules


def test_module_repr_state_dict_roundtrip():
    conv = gf.FilteredConv2d(3, 8, 3, stride=2, padding=1, radius=3)
    assert "radius=3" in repr(conv)
    assert isinstance(conv, nn.Conv2d)
    plain = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 9, 9)
    assert torch.equal(plain(x), conv(x))
    back = gf.FilteredConv2d(3, 8, 3, stride=2, padding=1, radius=2)
    back.load_state_dict(plain.state_dict())
    assert torch.equal(back.weight, conv.weight)
    c1 = gf.FilteredConv1d(3, 8, 5, radius=2)
    assert "radius=2" in repr(c1) and set(c1.state_dict()) == {"weight", "bias"}


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("radius,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                        (True, TypeError), ("2", TypeError)])
def test_bad_radius(radius, exc):
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    with pytest.raises(exc, match="radius"):
        gf.conv2d(x, torch.randn(2, 2, 3, 3), radius=radius)
    with pytest.raises(exc, match="radius"):
        gf.FilteredConv2d(2, 2, 3, radius=radius)


def test_wrong_rank():
    with pytest.raises(ValueError, match="4-D"):
        gf.conv2d(torch.randn(5, 5), torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match="3-D"):
        gf.conv1d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3))


def test_padding_mode():
    with pytest.raises(ValueError, match="padding_mode"):
        gf.FilteredConv2d(2, 2, 3, padding=1, padding_mode="reflect")


def test_unhandled_dilation():
    x = torch.randn(1, 2, 20, 20, requires_grad=True)
    with pytest.raises(gf.UnsupportedDilationError, match="dilation 3"):
        gf.conv2d(x, torch.randn(2, 2, 3, 3), padding=3, dilation=3, radius=2)


def test_double_backward_raises():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    y = gf.conv2d(x, w, padding=1, radius=2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


# ------------------------------------------------------------------------------------------------
# dtypes, autocast, compile


def _conv_dtype_supported(dtype, device):
    try:
        F.conv2d(torch.randn(1, 2, 4, 4, dtype=dtype, device=device),
                 torch.randn(2, 2, 3, 3, dtype=dtype, device=device))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(dtype, device):
    if not _conv_dtype_supported(dtype, device):
        pytest.skip(f"F.conv2d has no {dtype} kernel on {device}")
    torch.manual_seed(0)
    x64 = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    w64 = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    x = x64.to(device, dtype).requires_grad_()
    w = w64.to(device, dtype).requires_grad_()
    y = gf.conv2d(x, w, None, 1, 1, radius=2)
    assert y.dtype == dtype and torch.equal(y, F.conv2d(x, w, None, 1, 1))
    gy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy.to(device, dtype))
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    x_ref, w_ref = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    gf.conv2d(x_ref, w_ref, None, 1, 1, radius=2).backward(gy)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(w.grad.double().cpu(), w_ref.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(x.grad.double().cpu(), x_ref.grad, rtol=tol, atol=tol * 10)


def test_autocast_cpu_bf16():
    torch.manual_seed(0)
    conv = gf.FilteredConv2d(4, 6, 3, padding=1, radius=2)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        y_ref = plain(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_meta_device_shape_only_run():
    """On the meta device (shape-only runs: deferred initialisation, memory planning) the
    filtered conv behaves as nn.Conv2d does: forward and backward give meta tensors of the right
    shapes. Autocast exists for no meta device type, so asking for it raised before."""
    conv = gf.FilteredConv2d(4, 6, 3, stride=2, padding=1, radius=2, device="meta")
    x = torch.randn(2, 4, 12, 12, device="meta", requires_grad=True)
    y = conv(x)
    assert y.device.type == "meta" and y.shape == (2, 6, 6, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape and conv.weight.grad.shape == conv.weight.shape
    assert conv.weight.grad.device.type == "meta"


def test_torch_compile_runs():
    torch.manual_seed(0)
    model = nn.Sequential(gf.FilteredConv2d(3, 8, 3, padding=1, radius=2), nn.ReLU(),
                          gf.FilteredConv2d(8, 4, 3, stride=2, padding=1, radius=2))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    eager_y = model(x)
    eager = torch.autograd.grad(eager_y.sum(), [x, *model.parameters()])
    compiled = torch.compile(model, backend="aot_eager")
    y = compiled(x)
    assert torch.allclose(y, eager_y, atol=1e-6)
    grads = torch.autograd.grad(y.sum(), [x, *model.parameters()])
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_inductor():
    model = nn.Sequential(gf.FilteredConv2d(3, 8, 3, padding=1, radius=2), nn.ReLU())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    ref = torch.autograd.grad(model(x).sum(), x)[0]
    out = torch.compile(model)(x)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], ref)


@pytest.mark.parametrize("k,groups,radius,padding", [(1, 1, 2, 0), (1, 4, 2, 0), (3, 1, 4, 1),
                                                     (3, 4, 3, 1)])
def test_backward_leaves_inputs_untouched(k, groups, radius, padding):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    w = torch.randn(4, 4 // groups, k, k, requires_grad=True)
    x0, w0 = x.detach().clone(), w.detach().clone()
    y = gf.conv2d(x, w, None, 1, padding, 1, groups, radius)
    gy = torch.randn_like(y)
    gy0 = gy.clone()
    y.backward(gy)
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(gy, gy0)


@pytest.mark.parametrize("size,radius", [(1, 2), (2, 4), (3, 3)])
def test_never_saves_more_than_vanilla_on_tiny_maps(size, radius):
    """Maps no larger than one patch: x̃ would be as large as x, so x itself is kept."""
    x = torch.randn(4, 8, size, size, requires_grad=True)
    conv = gf.FilteredConv2d(8, 8, 3, padding=1, radius=radius)
    saved, y = _saved(lambda: conv(x), conv.parameters())
    assert saved.bytes <= x.numel() * x.element_size()
    gy = torch.randn_like(y)
    y.backward(gy)
    _, gw, _ = filtered_grads(x.detach(), conv.weight.detach(), gy, (1, 1), (1, 1), 1,
                              (radius, radius))
    torch.testing.assert_close(conv.weight.grad.double(), gw, rtol=1e-4, atol=1e-4)
