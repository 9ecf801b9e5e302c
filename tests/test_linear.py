"""The classifier's one-pass native backward (gradfilter.linear, kernels.cpp linear_backward)
against loop oracles in float64 and against nn.Linear's own autograd in float64."""

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import native_buildable
from torch import nn

import gradfilter
from gradfilter import native

needs_native = pytest.mark.skipif(not native_buildable(), reason="no C++ toolchain for the kernels")


def _loop_products(g, x, w):
    """Oracle: gx[b, i] = Σ_o g[b, o] w[o, i]; gW[o, i] = Σ_b g[b, o] x[b, i]; gb[o] = Σ_b g[b, o],
    element by element in float64."""
    g, x, w = g.double(), x.double(), w.double()
    batch, rows = g.shape
    gx = torch.zeros(batch, w.shape[1], dtype=torch.float64)
    gw = torch.zeros(rows, x.shape[1], dtype=torch.float64)
    for o in range(rows):
        for b in range(batch):
            gx[b] += g[b, o] * w[o]
            gw[o] += g[b, o] * x[b]
    return gx, gw, g.sum(0)


# batch: one partial 16-row chunk, exactly one, several with a partial last (the kernel keeps 16
# rows of gx in registers and accumulates gW over chunks), the largest on the fast path, the
# first past it; rows O: not a multiple of 4 (the kernel's tail rows), several 64-row blocks;
# columns I: under one 16-wide tile, a partial last tile, whole tiles (streaming stores)
CASES = [(1, 5, 3), (3, 7, 21), (16, 131, 48), (17, 130, 37), (33, 67, 64), (64, 9, 100),
         (65, 11, 20), (8, 14, 1300), (3, 7, 300)]


@needs_native
@pytest.mark.parametrize("batch,rows,cols", CASES)
@pytest.mark.usefixtures("simd")
def test_linear_backward_matches_loop_oracle(batch, rows, cols):
    torch.manual_seed(batch * 1000 + rows + cols)
    g, x, w = torch.randn(batch, rows), torch.randn(batch, cols), torch.randn(rows, cols)
    want = _loop_products(g, x, w)
    got = native.linear_backward(g, x, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,rows,cols", CASES)
@pytest.mark.usefixtures("simd")
def test_linear_forward_matches_loop_oracle(batch, rows, cols, bias):
    """The node's forward (its own kernel: 4 × 4 tiles of x's and W's rows, smaller ones at
    the edges) against y[b, o] = Σ_i x[b, i] W[o, i] + b[o] in float64."""
    torch.manual_seed(batch + rows * 7 + cols)
    x, w = torch.randn(batch, cols), torch.randn(rows, cols)
    b = torch.randn(rows) if bias else None
    want = torch.zeros(batch, rows, dtype=torch.float64)
    for o in range(rows):
        want[:, o] = (x.double() * w[o].double()).sum(1) + (b[o].double() if bias else 0.0)
    with torch.no_grad():
        got = native.linear(x, w, b)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@needs_native
def test_linear_backward_only_what_is_asked():
    g, x, w = torch.randn(16, 40), torch.randn(16, 32), torch.randn(40, 32)
    want = _loop_products(g, x, w)
    gx, gw, gb = native.linear_backward(g, x, w, need_x=False, need_w=True, need_b=False)
    assert gx is None and gb is None
    torch.testing.assert_close(gw.double(), want[1], rtol=1e-5, atol=1e-4)
    gx, gw, gb = native.linear_backward(g, x, w, need_x=True, need_w=False, need_b=True)
    assert gw is None
    torch.testing.assert_close(gx.double(), want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb.double(), want[2], rtol=1e-5, atol=1e-4)


@needs_native
def test_linear_backward_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError, match="shapes do not match"):
        native.linear_backward(torch.randn(4, 5), torch.randn(4, 6), torch.randn(5, 7))


@needs_native
def test_fast_path_is_the_avx512_kernel_where_the_cpu_has_it():
    """The oracle tests above exercise the one-pass kernel, not ATen's fallback, on CPUs with
    AVX-512F (this project's machines); batch 65 and float64 take the fallback."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    has = " avx512f" in cpuinfo.read_text()
    assert native.linear_fast_path(16, torch.float32) == has
    assert native.linear_fast_path(64, torch.float32) == has
    assert not native.linear_fast_path(65, torch.float32)
    assert not native.linear_fast_path(16, torch.float64)


def _pair(bias=True, in_f=37, out_f=23):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Dropout(0.0), nn.Linear(in_f, out_f, bias=bias))
    fused = pickle.loads(pickle.dumps(plain))
    assert gradfilter.fuse_linear(fused, "1") == ["1"]
    return plain, fused


@needs_native
@pytest.mark.parametrize("shape", [(16, 37), (5, 3, 37)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_gradients_match_nn_linear_in_float64(shape, bias):
    """Input, weight and bias gradients of a fused layer (float32, the native node) against
    nn.Linear's autograd in float64; any leading dimensions flatten into the batch."""
    plain, fused = _pair(bias)
    x = torch.randn(*shape)
    g = torch.randn(*shape[:-1], 23)
    x32 = x.clone().requires_grad_()
    out = fused(x32)
    assert "LinearFn" in out.grad_fn.name()
    out.backward(g)
    plain = plain.double()
    x64 = x.double().requires_grad_()
    want = plain(x64)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    want.backward(g.double())
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1].weight.grad.double(), plain[1].weight.grad,
                               rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(fused[1].bias.grad.double(), plain[1].bias.grad,
                                   rtol=1e-5, atol=1e-5)


@needs_native
def test_frozen_parts_get_no_gradient():
    """A frozen weight gets none; an input that needs none gets none (the node asks autograd)."""
    _, fused = _pair()
    fused[1].weight.requires_grad_(False)
    x = torch.randn(8, 37, requires_grad=True)
    fused(x).sum().backward()
    assert fused[1].weight.grad is None and fused[1].bias.grad is not None
    assert x.grad is not None
    _, fused = _pair()
    fused(torch.randn(8, 37)).sum().backward()
    assert fused[1].weight.grad is not None


@needs_native
def test_other_inputs_run_nn_linear():
    """float64, no-grad and autocast inputs run F.linear (no native node)."""
    _, fused = _pair()
    out = fused.double()(torch.randn(4, 37, dtype=torch.float64))
    assert "LinearFn" not in out.grad_fn.name()
    _, fused = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(torch.randn(4, 37))
    assert out.dtype == torch.bfloat16 and "LinearFn" not in out.grad_fn.name()
    with torch.no_grad():
        assert fused(torch.randn(4, 37)).grad_fn is None


def test_fuse_linear_refuses_what_it_cannot_fuse():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="cannot fuse 0: Conv2d is not an nn.Linear"):
        gradfilter.fuse_linear(net, "0")
    assert gradfilter.fuse_linear(net, "*") == ["2"]  # a glob fuses what it can
    with pytest.raises(ValueError, match="cannot fuse 2: already fused"):
        gradfilter.fuse_linear(net, "2")
    with pytest.raises(ValueError, match="can be fused\n  2: already fused"):
        gradfilter.fuse_linear(net, "2", on_unsupported="skip")

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="MyLinear has its own forward"):
        gradfilter.fuse_linear(nn.Sequential(MyLinear(3, 2)), "0")
    with pytest.raises(ValueError, match="on_unsupported"):
        gradfilter.fuse_linear(net, "2", on_unsupported="ignore")


def test_remove_restores_nn_linear_and_state_dict_keys_stay():
    plain, fused = _pair()
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert gradfilter.remove(fused) == ["1"]
    assert type(fused[1]) is nn.Linear


@needs_native
def test_whole_model_pickles_with_a_fused_linear():
    _, fused = _pair()
    again = pickle.loads(pickle.dumps(fused))
    assert type(again[1]).__name__ == "FusedLinear"
    x = torch.randn(4, 37)
    torch.testing.assert_close(again(x), fused(x))
    assert "LinearFn" in again(x).grad_fn.name()


@needs_native
def test_fused_method_leaves_the_classifier_alone_and_fuse_linear_keeps_its_gradients():
    """No method fuses the classifier (vanilla would not have it); fuse_linear on a fused
    model's classifier gives the step nn.Linear's gradients (the native path off)."""
    from gradfilter.models import create_model
    from gradfilter.train import prepare_model

    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 2, 3, 4])
    net, info = prepare_model(create_model("mobilenet_v2", 10), "fused", 4, 2, x)
    assert type(net.classifier[1]) is nn.Linear and "classifier.1" not in info.fused
    assert gradfilter.fuse_linear(net, "classifier.1") == ["classifier.1"]
    net.eval()
    grads = []
    for on in (True, False):
        with native.use_native(on):
            net.zero_grad(set_to_none=True)
            out = net(x)
            assert ("LinearFn" in out.grad_fn.name()) == on
            F.cross_entropy(out, y).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)
