"""Memory-lean ReLU/ReLU6 (bit masks, exact) and eval-mode BatchNorm (exact / patch / frozen),
checked against PyTorch's own ops and an independent float64 loop oracle for the patch form."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradfilter
from gradfilter import count_saved, lean


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 100), p=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_pack_bits_round_trip(n, p, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=g) < p
    packed = lean.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(lean.unpack_bits(packed, mask.shape), mask)


def test_pack_bits_layout_is_little_endian_per_byte():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    assert lean.pack_bits(mask).tolist() == [0b10000001, 0b10]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op,ref", [(lean.relu, torch.relu), (lean.relu6, F.relu6)])
def test_packed_activations_match_pytorch_exactly(device, dtype, op, ref):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 7, 9, generator=g) * 5).to(device, dtype)
    x.view(-1)[:20] = torch.tensor([0.0, 6.0, -0.0, 5.999, 6.001] * 4, dtype=dtype)  # edges
    x.requires_grad_()
    gy = torch.randn(x.shape, generator=g).to(device, dtype)
    y, y_ref = op(x), ref(x)
    assert torch.equal(y, y_ref)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gx_ref,) = torch.autograd.grad(y_ref, x, gy)
    assert torch.equal(gx, gx_ref)


def test_packed_relu_saves_one_bit_per_element():
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    with count_saved([x]) as plain:
        torch.relu(x * 1)
    with count_saved([x]) as packed:
        lean.relu(x * 1)
    assert plain.bytes == x.numel() * 4
    assert packed.bytes == x.numel() // 8


def _bn_case(seed=0, shape=(3, 4, 7, 10)):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    mean = torch.randn(c, generator=g, dtype=torch.float64)
    var = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    w = torch.randn(c, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, mean, var, w, b, gy


def test_lean_batchnorm_exact_mode_matches_pytorch():
    x, mean, var, w, b, gy = _bn_case()
    for t in (x, w, b):
        t.requires_grad_()
    y_ref = F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-3)
    y = lean.batch_norm_eval(x, mean, var, w, b, 1e-3)
    assert torch.equal(y, y_ref)
    ref = torch.autograd.grad(y_ref, (x, w, b), gy)
    got = torch.autograd.grad(y, (x, w, b), gy)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e)


def _patch_weight_grad_oracle(x, mean, var, gy, eps, r):
    """Independent loops: sum over patches of (sum_P g)(sum_P x)/|P|, minus mean * sum g,
    over sqrt(var + eps)."""
    x, gy = x.detach().numpy(), gy.numpy()
    n, c, h, w = x.shape
    out = np.zeros(c)
    for ci in range(c):
        acc = 0.0
        for ni, i0, j0 in itertools.product(range(n), range(0, h, r), range(0, w, r)):
            px = x[ni, ci, i0:i0 + r, j0:j0 + r]
            pg = gy[ni, ci, i0:i0 + r, j0:j0 + r]
            acc += pg.sum() * px.sum() / px.size
        out[ci] = (acc - mean[ci].item() * gy[:, ci].sum()) / np.sqrt(var[ci].item() + eps)
    return torch.from_numpy(out)


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_lean_batchnorm_patch_weight_grad_matches_loop_oracle(r):
    x, mean, var, w, b, gy = _bn_case(seed=r)
    w.requires_grad_()
    b.requires_grad_()
    x.requires_grad_()
    y = lean.batch_norm_eval(x, mean, var, w, b, 1e-3, radius=r)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    torch.testing.assert_close(gw, _patch_weight_grad_oracle(x, mean, var, gy, 1e-3, r))
    # input and bias gradients stay exact
    ref = torch.autograd.grad(F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-3), (x, b), gy)
    torch.testing.assert_close(gx, ref[0])
    torch.testing.assert_close(gb, ref[1])


def test_lean_batchnorm_patch_is_exact_for_patch_constant_gradients():
    """DC oracle: g constant on each r x r patch (7 x 10 map, partial last patches) makes the
    patch form exact."""
    x, mean, var, w, b, _ = _bn_case(seed=7)
    r = 3
    coarse = torch.randn(3, 4, 3, 4, dtype=torch.float64)
    gy = coarse.repeat_interleave(r, 2).repeat_interleave(r, 3)[:, :, :7, :10].contiguous()
    w.requires_grad_()
    (exact,) = torch.autograd.grad(F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-3), w, gy)
    (patch,) = torch.autograd.grad(lean.batch_norm_eval(x, mean, var, w, b, 1e-3, r), w, gy)
    torch.testing.assert_close(patch, exact)


def test_lean_batchnorm_saves_little():
    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    mean, var = torch.zeros(8), torch.ones(8)
    w = torch.ones(8, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    params = [x, w, b, mean, var]
    with count_saved(params) as plain:
        F.batch_norm(x * 1, mean, var, w, b, False, 0.0, 1e-5)
    with count_saved(params) as patch:
        lean.batch_norm_eval(x * 1, mean, var, w, b, 1e-5, radius=4)
    with count_saved(params) as frozen:
        lean.batch_norm_eval(x * 1, mean, var, w.detach(), b, 1e-5, radius=4)
    assert plain.bytes >= x.numel() * 4
    assert patch.bytes <= x.numel() * 4 // 16 + 3 * 8 * 4
    assert frozen.bytes <= 8 * 4


def test_batch_norm_eval_rejects_bad_radius():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="radius"):
        lean.batch_norm_eval(x, torch.zeros(3), torch.ones(3), None, None, 1e-5, radius=0)


def _mobilenet():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return tv.models.mobilenet_v2(num_classes=10)


def test_slim_converts_blocks_and_remove_restores():
    model = _mobilenet()
    blocks = ["features.16", "features.17"]
    gradfilter.freeze(model, blocks + ["classifier"])
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        want = model(x)
    names = gradfilter.slim(model, names=[f"{b}.*" for b in blocks], bn="patch", radius=2)
    assert "features.16.conv.0.2" in names and "features.17.conv.3" in names
    assert not any(n.startswith("features.15") for n in names)
    assert type(model.features[16].conv[0][2]).__name__ == "PackedReLU6"
    assert model.features[16].conv[0][1].bn_radius == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
    gradfilter.remove(model)
    assert type(model.features[16].conv[0][2]) is nn.ReLU6
    assert type(model.features[16].conv[0][1]) is nn.BatchNorm2d


def test_slim_frozen_bn_freezes_weight_and_errors_are_clear():
    model = _mobilenet()
    gradfilter.freeze(model, ["features.17", "classifier"])
    gradfilter.slim(model, names="features.17.*", bn="frozen")
    bn = model.features[17].conv[0][1]
    assert not bn.weight.requires_grad and bn.bias.requires_grad
    with pytest.raises(ValueError, match="bn must be one of"):
        gradfilter.slim(model, names="features.17.*", bn="approx")
    with pytest.raises(ValueError, match="no ReLU/ReLU6/BatchNorm module matched"):
        gradfilter.slim(model, names="nothing.*")
    unpinned = _mobilenet()
    gradfilter.slim(unpinned, names="features.17.*")
    unpinned.train()
    with pytest.raises(RuntimeError, match="needs eval mode"):
        unpinned(torch.randn(2, 3, 32, 32))


def test_slim_handles_timm_batchnorm_act():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    names = gradfilter.slim(model, names="blocks.6.*", bn="exact")
    assert "blocks.6.0.bn1" in names and "blocks.6.0.bn1.act" in names
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_lean_prepare_saves_8x_less_in_trainable_blocks():
    """r=4, last 4 blocks of MobileNetV2: the convs alone save ~1.4x less, the lean blocks
    >= 8x less (the issue's memory target) — measured with saved_tensors_hooks."""
    from gradfilter.train import prepare_model

    x = torch.randn(4, 3, 96, 96)
    saved = {}
    for method, lean_mode in [("vanilla", None), ("filtered", None), ("lean", "patch")]:
        model, info = prepare_model(_mobilenet(), method, 4, 4, x[:2], lean=lean_mode)
        model.train()
        with count_saved(model.parameters(), model=model) as s:
            model(x).sum()
        saved[(method, lean_mode)] = s.bytes_under(info.blocks)
    assert saved[("vanilla", None)] / saved[("filtered", None)] < 2
    assert saved[("vanilla", None)] / saved[("lean", "patch")] >= 8
