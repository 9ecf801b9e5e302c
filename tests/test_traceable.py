"""gradfilter.traceable (the stop-gradient form) against the float64 spec (tests/spec.py),
F.conv2d's forward, autograd's exact input gradient, and the lean layers' eager ops."""

import pytest
import torch
import torch.nn.functional as F
from cases import draw_channels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spec import filtered_grads

import gradfilter as gf
from gradfilter import lean, traceable
from gradfilter.nn import tf_same_pads

F64 = torch.float64


@st.composite
def conv_cases(draw):
    groups, cin, cout = draw_channels(draw)
    stride = draw(st.sampled_from([1, 2]))
    radius = draw(st.integers(1, 5))
    if draw(st.booleans()):  # summed taps (d < r·s included)
        k = draw(st.sampled_from([1, 3, 5]))
        dilation = draw(st.sampled_from([1, 2]))
        padding = draw(st.sampled_from([0, 1, "same"] if stride == 1 else [0, 1]))
    else:  # atrous: kept taps, d a multiple of r·s
        k = draw(st.sampled_from([3, 5]))
        dilation = radius * stride * draw(st.integers(1, 2))
        same = dilation * (k - 1) // 2
        padding = draw(st.sampled_from([0, same, "same"] if stride == 1 else [0, same]))
    span = dilation * (k - 1) + 1
    low = 1 if padding == "same" else max(1, span - 2 * padding)
    h = draw(st.integers(low, max(low, 12) + 2))
    w = draw(st.integers(low, max(low, 12) + 2))
    n = draw(st.integers(1, 4))
    return dict(n=n, cin=cin, cout=cout, groups=groups, k=k, stride=stride, dilation=dilation,
                padding=padding, radius=radius, h=h, w=w)


def _tensors(c, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=g, dtype=F64)
    w = torch.randn(c["cout"], c["cin"] // c["groups"], c["k"], c["k"], generator=g, dtype=F64)
    b = torch.randn(c["cout"], generator=g, dtype=F64) if bias else None
    return x, w, b, g


def _args(c):
    return c["stride"], c["padding"], c["dilation"], c["groups"], c["radius"]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=conv_cases())
def test_conv2d_matches_float64_spec_and_forward_is_f_conv2d(c):
    x, w, b, g = _tensors(c)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = traceable.conv2d(x, w, b, *_args(c))
    assert torch.equal(y, F.conv2d(x, w, b, *_args(c)[:-1]))
    gy = torch.randn(y.shape, generator=g, dtype=F64)
    got = torch.autograd.grad(y, (x, w, b), gy)
    s, d, r = (c["stride"],) * 2, (c["dilation"],) * 2, (c["radius"],) * 2
    want = filtered_grads(x.detach(), w.detach(), gy, s, d, c["groups"], r)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=conv_cases())
def test_exact_input_grad(c):
    """input_grad="exact": gx is autograd's through F.conv2d, gW and gb the spec's."""
    x, w, b, g = _tensors(c, seed=1)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = traceable.conv2d(x, w, b, *_args(c), input_grad="exact")
    ref = F.conv2d(x, w, b, *_args(c)[:-1])
    assert torch.equal(y, ref)
    gy = torch.randn(y.shape, generator=g, dtype=F64)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    (ex,) = torch.autograd.grad(ref, x, gy)
    _, sw, sb = filtered_grads(x.detach(), w.detach(), gy, (c["stride"],) * 2,
                               (c["dilation"],) * 2, c["groups"], (c["radius"],) * 2)
    torch.testing.assert_close(gx, ex, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, sw, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gb, sb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("input_grad", ["filtered", "exact"])
@pytest.mark.parametrize("stride,padding,dilation,groups,radius", [
    (2, 2, 1, 2, 3), (1, "same", 1, 1, 4), (1, 0, 2, 6, 2), (1, 6, 6, 1, 3), (2, 0, 1, 1, 5),
])
def test_conv1d_matches_spec_on_height_one(input_grad, stride, padding, dilation, groups, radius):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 23, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(6, 6 // groups, 3, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    y = traceable.conv1d(x, w, b, stride, padding, dilation, groups, radius, input_grad)
    ref = F.conv1d(x, w, b, stride, padding, dilation, groups)
    assert torch.equal(y, ref)
    gy = torch.randn(y.shape, generator=g, dtype=F64)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    sx, sw, sb = filtered_grads(x.detach().unsqueeze(2), w.detach().unsqueeze(2),
                                gy.unsqueeze(2), (1, stride), (1, dilation), groups, (1, radius))
    if input_grad == "exact":
        (sx,) = torch.autograd.grad(ref, x, gy)
    else:
        sx = sx.squeeze(2)
    torch.testing.assert_close(gx, sx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gw, sw.squeeze(2), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gb, sb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rh,rw,sh,sw", [(2, 3, 1, 2), (3, 1, 2, 1)])
def test_anisotropic_radius_and_stride(rh, rw, sh, sw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 11, 9, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=F64, requires_grad=True)
    y = traceable.conv2d(x, w, None, (sh, sw), 1, 1, 1, radius=(rh, rw))
    gy = torch.randn(y.shape, generator=g, dtype=F64)
    got = torch.autograd.grad(y, (x, w), gy)
    want = filtered_grads(x.detach(), w.detach(), gy, (sh, sw), (1, 1), 1, (rh, rw))[:2]
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_grid_inside_the_map_and_mixed_kept_taps():
    """A 'valid' 5×5 conv whose input grid starts inside the map (border rows get no gradient),
    and a conv that keeps its taps on one axis only (dilation ≥ r·s there, not on the other)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 12, 13, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(4, 3, 5, 5, generator=g, dtype=F64, requires_grad=True)
    y = traceable.conv2d(x, w, None, 1, 0, 1, 1, 4)
    gy = torch.randn(y.shape, generator=g, dtype=F64)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    sx, sw, _ = filtered_grads(x.detach(), w.detach(), gy, (1, 1), (1, 1), 1, (4, 4))
    assert (gx[:, :, :2] == 0).all() and (gx[:, :, -2:] == 0).all()
    torch.testing.assert_close(gx, sx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, sw, rtol=1e-10, atol=1e-10)

    w = torch.randn(4, 3, 3, 3, generator=g, dtype=F64, requires_grad=True)
    y = traceable.conv2d(x, w, None, 1, (4, 1), (4, 1), 1, (2, 3))  # keeps taps on H only
    gy = torch.randn(y.shape, generator=g, dtype=F64)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    sx, sw, _ = filtered_grads(x.detach(), w.detach(), gy, (1, 1), (4, 1), 1, (2, 3))
    torch.testing.assert_close(gx, sx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, sw, rtol=1e-10, atol=1e-10)
    assert gw[0, 0, :, 0].unique().numel() == 3 and gw[0, 0, 0].unique().numel() == 1


@pytest.mark.parametrize("input_grad", ["filtered", "exact"])
@pytest.mark.parametrize("size,stride", [(10, 2), (9, 2), (8, 1)])
def test_tf_same_asymmetric_padding(input_grad, size, stride):
    """timm's Conv2dSame: x padded by TensorFlow 'SAME' (odd pixel after), then a 'valid' conv;
    the grid lies on the padded map, as in the op."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, size, size + 1, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, generator=g, dtype=F64, requires_grad=True)
    pads = tf_same_pads(x.shape[2:], (3, 3), (stride,) * 2, (1, 1))
    assert pads[0] != pads[1] or pads[2] != pads[3] or stride == 1

    def run(fn):
        y = fn(F.pad(x, pads), w, None, stride, 0, 1, 4, 3, input_grad=input_grad)
        return y, torch.autograd.grad(y, (x, w), gy)

    gy = torch.randn(2, 4, -(-size // stride), -(-(size + 1) // stride), generator=g, dtype=F64)
    y, got = run(traceable.conv2d)
    y0, want = run(gf.conv2d)
    assert torch.equal(y, y0)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_gradient_subsets_unbatched_and_no_grad():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 9, 10, generator=g, dtype=F64)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=F64)
    b = torch.randn(5, generator=g, dtype=F64)
    gy = torch.randn(5, 9, 10, generator=g, dtype=F64)
    with torch.no_grad():
        assert torch.equal(traceable.conv2d(x, w, b, padding=1), F.conv2d(x, w, b, padding=1))
    for needs in [(True, False, False), (False, True, False), (False, False, True),
                  (True, True, True)]:
        leaves = [t.clone().requires_grad_(n) for t, n in zip((x, w, b), needs)]
        inputs = [t for t in leaves if t.requires_grad]
        got = torch.autograd.grad(traceable.conv2d(*leaves, padding=1, radius=3), inputs, gy)
        want = torch.autograd.grad(gf.conv2d(*leaves, padding=1, radius=3), inputs, gy)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_float32_agrees_with_the_op():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 16, 28, 28, generator=g, requires_grad=True)
    w = torch.randn(32, 16, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(32, generator=g, requires_grad=True)
    gy = torch.randn(4, 32, 14, 14, generator=g)
    got = torch.autograd.grad(traceable.conv2d(x, w, b, 2, 1, radius=4), (x, w, b), gy)
    want = torch.autograd.grad(gf.conv2d(x, w, b, 2, 1, radius=4), (x, w, b), gy)
    for a, e in zip(got, want):
        assert ((a - e).abs().max() / e.abs().max()).item() < 1e-5


@pytest.mark.parametrize("groups", [1, 16])
@pytest.mark.parametrize("input_grad", ["filtered", "exact"])
def test_saves_patch_sums_not_the_input(groups, input_grad):
    """What autograd keeps: x̃, W̃ and the (Ph, Pw) scale (the op: x̃ and W), never x."""
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    w = torch.randn(16, 16 // groups, 3, 3, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    with gf.count_saved(exclude=[w, b]) as ours:
        y = traceable.conv2d(x, w, b, 1, 1, 1, groups, 4, input_grad=input_grad)
    with gf.count_saved(exclude=[w, b]) as op:
        gf.conv2d(x, w, b, 1, 1, 1, groups, 4, input_grad=input_grad)
    xt = 4 * 16 * 8 * 8 * 4
    assert op.bytes == xt
    assert xt <= ours.bytes <= xt + w.numel() * 4 // 9 + 8 * 8 * 4
    assert x.untyped_storage().data_ptr() not in ours.storages
    y.sum().backward()  # and the graph still runs


def test_rejects_what_the_op_rejects():
    x, w = torch.randn(1, 2, 20, 20, requires_grad=True), torch.randn(2, 2, 3, 3)
    with pytest.raises(gf.UnsupportedDilationError):
        traceable.conv2d(x, w, None, 1, 3, 3, 1, radius=2)
    with pytest.raises(ValueError, match="input_grad"):
        traceable.conv2d(x, w, input_grad="approx")
    with pytest.raises(ValueError, match="radius"):
        traceable.conv2d(x, w, radius=0)


def test_tracing_flag_is_off_in_eager():
    assert not traceable.tracing()


# ---------------------------------------------------------------------------------------------
# Lean layers


@pytest.mark.parametrize("upper", [None, 6.0])
def test_relu_forms_have_the_packed_gradient(upper):
    x = torch.tensor([-1.0, 0.0, 0.5, 6.0, 7.0, 3.0]).reshape(1, 1, 2, 3).requires_grad_()
    packed = lean.relu(x) if upper is None else lean.relu6(x)
    plain = torch.relu(x) if upper is None else F.relu6(x)
    assert torch.equal(packed, plain)
    gy = torch.arange(1.0, 7.0).reshape(x.shape)
    (a,) = torch.autograd.grad(packed, x, gy)
    (b,) = torch.autograd.grad(plain, x, gy)
    assert torch.equal(a, b)


@pytest.mark.parametrize("spatial", [(7, 9), (8, 8), (11,)])
@pytest.mark.parametrize("mode", ["exact", "patch", "frozen", "no-affine"])
def test_batch_norm_forms_match_the_lean_op(spatial, mode):
    g = torch.Generator().manual_seed(7)
    c = 5
    x = torch.randn(3, c, *spatial, generator=g, dtype=F64, requires_grad=True)
    mean = torch.randn(c, generator=g, dtype=F64)
    var = torch.rand(c, generator=g, dtype=F64) + 0.5
    affine = mode != "no-affine"
    w = (torch.randn(c, generator=g, dtype=F64) + 2).requires_grad_(mode in ("exact", "patch"))
    b = torch.randn(c, generator=g, dtype=F64).requires_grad_()
    w, b = (w, b) if affine else (None, None)
    radius = 3 if mode == "patch" else None
    gy = torch.randn(x.shape, generator=g, dtype=F64)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]

    y = traceable.batch_norm_eval(x, mean, var, w, b, 1e-5, radius)
    y0 = lean.batch_norm_eval(x, mean, var, w, b, 1e-5, radius)
    assert torch.equal(y, y0)
    got = torch.autograd.grad(y, inputs, gy)
    want = torch.autograd.grad(y0, inputs, gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    if mode == "patch":  # the patch weight gradient is not the exact one (the test can fail)
        exact = torch.autograd.grad(F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5), w, gy)
        assert not torch.allclose(got[1], exact[0])
