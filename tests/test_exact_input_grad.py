"""``input_grad="exact"``: filtered weight gradients, exact input gradients, same saved tensors.

Oracles: the input gradient of plain ``F.conv2d``/``F.conv1d`` under autograd, and the float64
spec of docs/spec.md §4 (tests/spec.py) for the weight and bias gradients.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from spec import filtered_grads
from test_ops_spec import conv_cases
from torch import nn

import gradfilter as gf
from gradfilter.train.runner import _check_resume_config


def _case_tensors(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=g, dtype=torch.float64)
    w = torch.randn(c["cout"], c["cin"] // c["groups"], c["k"], c["k"], generator=g,
                    dtype=torch.float64)
    b = torch.randn(c["cout"], generator=g, dtype=torch.float64)
    return x, w, b, g


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_exact_input_grad_matches_autograd_and_spec(c):
    x, w, b, g = _case_tensors(c)
    args = (c["stride"], c["padding"], c["dilation"], c["groups"])
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = gf.conv2d(xs, ws, bs, *args, radius=c["radius"], input_grad="exact")
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    # input gradient: plain autograd through F.conv2d
    xp = x.clone().requires_grad_()
    F.conv2d(xp, w, b, *args).backward(gy)
    torch.testing.assert_close(xs.grad, xp.grad, rtol=1e-10, atol=1e-10)
    # weight and bias gradients: the filtered ones, by the letter of the spec
    _, gw, gb = filtered_grads(x, w, gy, (c["stride"],) * 2, (c["dilation"],) * 2, c["groups"],
                               (c["radius"],) * 2)
    torch.testing.assert_close(ws.grad, gw, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bs.grad, gb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("padding", [0, 2, "same", "valid"])
@pytest.mark.parametrize("stride", [1, 2])
def test_exact_input_grad_conv1d(padding, stride):
    if padding == "same" and stride == 2:
        pytest.skip("F.conv1d refuses padding='same' with stride 2")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 23, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)  # even kernel: asymmetric 'same'
    y = gf.conv1d(x, w, None, stride, padding, 1, 1, radius=3, input_grad="exact")
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, gy)
    (ref,) = torch.autograd.grad(F.conv1d(x, w, None, stride, padding), x, gy)
    torch.testing.assert_close(gx, ref, rtol=1e-10, atol=1e-10)


def test_exact_input_grad_saves_what_filtered_saves():
    x = torch.randn(4, 16, 30, 40, requires_grad=True)
    sizes = {}
    for mode in ("filtered", "exact"):
        conv = gf.FilteredConv2d(16, 32, 3, padding=1, radius=4, input_grad=mode)
        with gf.count_saved(conv.parameters()) as saved:
            conv(x)
        sizes[mode] = saved.bytes
    assert sizes["exact"] == sizes["filtered"] == 4 * 16 * 8 * 10 * 4  # x̃ only


def test_bad_input_grad_mode_is_one_clear_error():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="input_grad must be one of 'filtered', 'exact'"):
        gf.conv2d(x, torch.randn(2, 2, 3, 3), radius=2, input_grad="approx")
    with pytest.raises(ValueError, match="input_grad"):
        gf.FilteredConv2d(2, 2, 3, input_grad="yes")
    with pytest.raises(ValueError, match="input_grad"):
        gf.apply(nn.Sequential(nn.Conv2d(2, 2, 3)), radius=2, input_grad="full")


def test_apply_sets_and_remove_clears_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    model(x).square().sum().backward()
    exact_gx = x.grad.clone()
    x.grad = None
    gf.apply(model, radius=2, names="2", input_grad="exact")
    assert model[2].input_grad == "exact" and "input_grad='exact'" in repr(model[2])
    model(x).square().sum().backward()
    # only the last conv is filtered and it passes the exact gradient down: x.grad is exact
    torch.testing.assert_close(x.grad, exact_gx, rtol=1e-5, atol=1e-6)
    gf.remove(model)
    assert type(model[2]) is nn.Conv2d and "input_grad" not in model[2].__dict__


def test_resume_reads_version_0_1_checkpoints(tmp_path):
    """0.1 runs say method "gradfilter" (with lean and fuse entries) and may lack input_grad:
    they resume as the method they were (filtered, lean or fused), with filtered input grads."""
    keys = dict(model="m", data="d", image_size=8, num_classes=2, radius=2, train_last=1,
                optimizer="adamw", epochs=1, batch_size=2, lr=1e-3)
    old = {**keys, "method": "gradfilter", "lean": None}
    command = {**keys, "method": "filtered", "lean": None, "input_grad": "filtered"}
    _check_resume_config(tmp_path / "c.pt", old, command)
    with pytest.raises(ValueError, match="input_grad: checkpoint 'filtered', command 'exact'"):
        _check_resume_config(tmp_path / "c.pt", old, {**command, "input_grad": "exact"})
    fused = {**old, "lean": "patch", "fuse": True}
    _check_resume_config(tmp_path / "c.pt", fused, {**command, "method": "fused",
                                                     "lean": "patch"})
    with pytest.raises(ValueError, match="method: checkpoint 'fused', command 'lean'"):
        _check_resume_config(tmp_path / "c.pt", fused, {**command, "method": "lean",
                                                         "lean": "patch"})


def test_compare_labels_name_the_mode():
    from gradfilter.compare import _label

    row = {"method": "filtered", "radius": 4, "train_last": 5, "input_grad": "exact"}
    assert _label(row) == "filtered r=4 exact gx last 5"
    assert _label({**row, "input_grad": "filtered"}) == "filtered r=4 last 5"
