"""Fused blocks (gradfilter.blocks) against references that share no code with them.

* Spec oracle (float64, pure-PyTorch path): hand-built torchvision / timm inverted residuals and
  conv-BN-act blocks, stride 1 and 2. Reference: this file's forward with plain torch ops and its
  backward walk: g_out averaged over the real pixels of the block output's centred r×r patches
  (docs/spec.md §2.1, §4.1), exact eval-BatchNorm and ReLU/ReLU6 gradients from autograd on
  ``F.batch_norm``/``F.relu6``, each conv's filtered gradients from ``tests/spec.py`` (docs/spec.md
  §4,
  a loop oracle), the skip connection's gradient passed on unaveraged. A stride-2 block whose
  grids do not line up runs per layer, so its reference skips the averaging.
* Composition: on MobileNetV2 / EfficientNet-Lite0 prepared for fine-tuning (the gradient at
  each block output is patch-constant there), fused blocks give the per-layer filtered model's
  parameter gradients (float64 pure-PyTorch; float32 native kernels).
* Native ``bn_act_stats``: y against ``torch.clamp`` bit for bit, the patch sums against
  explicit patch loops (NaN, ±inf, exact 0 / 6 edges, tiny and large maps, offset grids).
* Errors and surgery: refusals and their reasons, ``gradfilter.remove``, the forward outputs,
  when the fused node runs, and the bytes saved for backward.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform

import pytest
import torch
import torch.nn.functional as F
from conftest import native_buildable
from hypothesis import given, settings
from hypothesis import strategies as st
from spec import filtered_grads
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

import gradfilter
from gradfilter import native
from gradfilter.blocks import (
    FusedBlockMixin,
    FusedHeadMixin,
    FusedPoolMixin,
    fusable,
    fuse_blocks,
)

timm_blocks = pytest.importorskip("timm.models._efficientnet_blocks")
timm_layers = pytest.importorskip("timm.layers")

needs_native = pytest.mark.skipif(not native_buildable(), reason="no C++ toolchain for the kernels")

FUSED_NODE = "FusedBlockBackward"


def _node(fn) -> str:
    """FUSED_NODE for a fused block's autograd node (the PyTorch reference path's Python
    Function or the native path's C++ node), else the node's type name. (torch < 2.10 refuses
    ``name()`` on a Python Function's node: its type name is enough there.)"""
    kind = type(fn).__name__
    if fn is None or kind == FUSED_NODE:
        return kind
    try:
        full = fn.name()
    except RuntimeError:
        return kind
    return FUSED_NODE if "FusedBlockFn" in full else kind


def _ceil_div(a, b):
    return -(-a // b)


def _centred(size, r):
    """(patches, top padding) of the centred r-grid over ``size`` pixels (docs/spec.md §2.1)."""
    p = _ceil_div(size, r)
    return p, _ceil_div(p * r - size, 2)


def _convs(block):
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)]


def _rel_err(got, ref):
    """max |got - ref| relative to max |ref|."""
    scale = ref.abs().max().clamp_min(1e-300)
    return ((got.double() - ref.double()).abs().max() / scale).item()


# ----------------------------------------------------------------------------------------------
# The reference: plain forward, then the block's backward walked unit by unit


def _patch_mean_map(g, r):
    """g replaced by its mean over the real pixels of each r×r patch of the centred grid."""
    h, w = g.shape[-2:]
    (ph, th), (pw, tw) = _centred(h, r), _centred(w, r)
    out = torch.empty_like(g)
    for i in range(ph):
        r0, r1 = max(i * r - th, 0), min((i + 1) * r - th, h)
        for j in range(pw):
            c0, c1 = max(j * r - tw, 0), min((j + 1) * r - tw, w)
            out[:, :, r0:r1, c0:c1] = g[:, :, r0:r1, c0:c1].mean((2, 3), keepdim=True)
    return out


def _units_of(block):
    """([(conv, bn, activation)], has skip) read off an unconverted block's structure."""
    if hasattr(block, "conv_pwl"):  # timm InvertedResidual (BatchNormAct2d carries the act)
        pieces = [(block.conv_pw, block.bn1), (block.conv_dw, block.bn2),
                  (block.conv_pwl, block.bn3)]
        return [(c, b, b.act) for c, b in pieces], block.has_skip
    if hasattr(block, "use_res_connect"):  # torchvision InvertedResidual
        mods = list(block.conv)
        units = [(m[0], m[1], m[2]) for m in mods[:-2]]
        return units + [(mods[-2], mods[-1], None)], block.use_res_connect
    mods = list(block)  # Conv2dNormActivation
    return [(mods[0], mods[1], mods[2] if len(mods) == 3 else None)], False


def _act(act, v):
    if act is None or isinstance(act, nn.Identity):
        return v
    if isinstance(act, nn.ReLU6):
        return F.relu6(v)
    assert isinstance(act, nn.ReLU)
    return F.relu(v)


def _same_pad(size, k, s):
    """(before, after) of TF 'same' padding (timm Conv2dSame)."""
    total = max((_ceil_div(size, s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _conv_input(conv, t):
    """What the conv reads, and its own padding: timm's Conv2dSame pads the map itself."""
    if isinstance(conv, timm_layers.Conv2dSame):
        (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
        top, bottom = _same_pad(t.shape[2], kh, sh)
        left, right = _same_pad(t.shape[3], kw, sw)
        return F.pad(t, (left, right, top, bottom)), (0, 0), (top, left)
    return t, conv.padding, (0, 0)


def _bn(z, bn, gamma, beta):
    return F.batch_norm(z, bn.running_mean, bn.running_var, gamma, beta, False, 0.0, bn.eps)


def _reference(block, x, g_out, r, average):
    """(output, {parameter name: gradient}, input gradient) of ``block`` (unconverted, eval)."""
    units, skip = _units_of(block)
    names = {id(p): n for n, p in block.named_parameters()}
    t, seen = x, []
    for conv, bn, act in units:
        t_in, pad, crop = _conv_input(conv, t)
        z = F.conv2d(t_in, conv.weight, conv.bias, conv.stride, pad, conv.dilation, conv.groups)
        seen.append((t_in, crop, t.shape, z))
        t = _act(act, _bn(z, bn, bn.weight, bn.bias))
    out = t + x if skip else t

    g = _patch_mean_map(g_out, r) if average else g_out
    grads, clamps = {}, 0
    for (conv, bn, act), (t_in, crop, shape, z) in reversed(list(zip(units, seen))):
        z = z.clone().requires_grad_()
        gamma = bn.weight.clone().requires_grad_()
        beta = bn.bias.clone().requires_grad_()
        v = _bn(z, bn, gamma, beta)
        clamps += int(isinstance(act, nn.ReLU6) and bool((v > 6).any()))
        gz, grads[names[id(bn.weight)]], grads[names[id(bn.bias)]] = torch.autograd.grad(
            _act(act, v), (z, gamma, beta), g)
        gx, gw, gb = filtered_grads(t_in, conv.weight, gz, conv.stride, conv.dilation,
                                    conv.groups, (r, r))
        grads[names[id(conv.weight)]] = gw
        if conv.bias is not None:
            grads[names[id(conv.bias)]] = gb
        g = gx[:, :, crop[0]:crop[0] + shape[2], crop[1]:crop[1] + shape[3]]
    return out, grads, (g + g_out if skip else g), clamps


def _stride2_aligned(size, k, r, tf_same):
    """Whether a stride-2 conv's 2r×2r input patches (docs/spec.md §2.2) are unions of 2×2 patches
    of
    the stride-1 grid over its input: then the block runs fused, else per layer."""
    p1, t1 = _centred(size, r)
    if tf_same:
        before, after = _same_pad(size, k, 2)
        seen, out = size + before + after, _ceil_div(size, 2)
    else:
        before, seen, out = 0, size, (size - 1) // 2 + 1
    p2 = _ceil_div(out, r)
    return _ceil_div(2 * r * p2 - seen, 2) + before == t1 and 2 * p2 >= p1


def _randomise(block, gen):
    """Random BatchNorm statistics and affines (negative γ included), large enough that ReLU6
    clamps at both ends; channel 0 maps z = 0 to v = 0."""
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) * 0.75 + 0.25)
                m.weight.copy_(torch.randn(c, generator=gen) * 2.5)
                m.bias.copy_(torch.randn(c, generator=gen))
                m.running_mean[0] = m.bias[0] = 0.0  # a zero input gives v = 0 exactly
            elif isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                               / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return block.eval()


def _fit_batchnorm(model, bias=None):
    """Fitted-looking BatchNorm statistics (so masks and scales are not trivial); with ``bias``
    (a range) also affine weights in [0.5, 1.5] and biases in that range."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if bias is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(*bias)

BLOCKS = {
    "ir_skip": lambda: InvertedResidual(4, 4, stride=1, expand_ratio=6),
    "ir_no_skip": lambda: InvertedResidual(3, 5, stride=1, expand_ratio=6),
    "ir_t1": lambda: InvertedResidual(4, 4, stride=1, expand_ratio=1),
    "cna_1x1_relu6_bias": lambda: Conv2dNormActivation(5, 7, kernel_size=1,
                                                       activation_layer=nn.ReLU6, bias=True),
    "cna_dw3_relu_bias": lambda: Conv2dNormActivation(6, 6, kernel_size=3, groups=6,
                                                      activation_layer=nn.ReLU, bias=True),
    "cna_3x3_no_act": lambda: Conv2dNormActivation(3, 4, kernel_size=3, activation_layer=None),
    "timm_ir_k5": lambda: timm_blocks.InvertedResidual(4, 4, dw_kernel_size=5, exp_ratio=4.0,
                                                       act_layer=nn.ReLU6),
}
SIZES = [(7, 7, 4), (9, 11, 2)]  # h, w, r: odd maps, not divisible by r


def _fused_copy(block, r):
    """nn.Sequential(block) filtered at radius r, everything trainable, BatchNorm eval, fused."""
    model = nn.Sequential(copy.deepcopy(block))
    gradfilter.apply(model, radius=r)
    gradfilter.freeze(model, trainable=lambda n, m: True)
    assert fuse_blocks(model, ["0"]) == ["0"]
    return model


@contextlib.contextmanager
def _native_form(use_native: bool | str):
    """The native path (one C++ call each way from a C++ autograd node; ``"portable"``: with
    the kernels' non-SSE/AVX paths) or the PyTorch reference path (a Python autograd Function
    looping over the units)."""
    with native.use_native(bool(use_native)):
        if use_native == "portable":
            with native.use_simd(False):
                yield
        else:
            yield


def _check_against_reference(block, h, w, r, seed, x_grad=True, frozen=(), fused=True,
                             use_native=False):
    gen = torch.Generator().manual_seed(seed)
    block = _randomise(block, gen).double()
    x = torch.randn(2, _convs(block)[0].in_channels, h, w, generator=gen, dtype=torch.float64) * 2
    x[:, :, : h // 2, : w // 2] = 0  # activations meet the masks' edge (v = 0) exactly
    with torch.no_grad():
        out_shape = block(x).shape
    g_out = torch.randn(out_shape, generator=gen, dtype=torch.float64)  # not patch-constant
    model = _fused_copy(block, r)
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.endswith(f) for f in frozen))
    xg = x.clone().requires_grad_(x_grad)
    # native: one C++ call each way, in float64
    with _native_form(use_native):
        y = model(xg)
        assert (_node(y.grad_fn) == FUSED_NODE) == fused
        y.backward(g_out)

    ref_out, ref_grads, ref_gx, clamps = _reference(block, x, g_out, r, average=fused)
    with torch.no_grad():  # the reference reads the block as the block runs itself
        assert _rel_err(block(x), ref_out) < 1e-13
    assert _rel_err(y.detach(), ref_out) < 1e-12
    if any(isinstance(a, nn.ReLU6) for _, _, a in _units_of(block)[0]):
        assert clamps, "test data never reaches ReLU6's upper bound"
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        ref = ref_grads[name.removeprefix("0.")]
        assert p.grad is not None, name
        err = _rel_err(p.grad, ref)
        assert err < 1e-10, f"{name}: relative error {err:.2e}"
    if x_grad:
        err = _rel_err(xg.grad, ref_gx)
        assert err < 1e-10, f"input gradient: relative error {err:.2e}"
    else:
        assert xg.grad is None


NATIVE = [False, pytest.param(True, marks=needs_native, id="native"),
          pytest.param("portable", marks=needs_native, id="native-portable")]


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("h,w,r", SIZES)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_fused_block_matches_spec_oracle(kind, h, w, r, use_native):
    _check_against_reference(BLOCKS[kind](), h, w, r, seed=10 * list(BLOCKS).index(kind) + r,
                             use_native=use_native)


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("frozen", [("1.weight", "2.weight"), ("0.weight",)])
def test_fused_block_with_frozen_parameters_and_no_input_grad_matches_spec_oracle(frozen,
                                                                                  use_native):
    """BatchNorm weights frozen (the masked sums are not kept) / the first conv frozen; the
    block input needs no gradient (the first trained block of a fine-tuned net)."""
    _check_against_reference(BLOCKS["ir_skip"](), 9, 11, 2, seed=5, x_grad=False,
                             frozen=frozen, use_native=use_native)
    _check_against_reference(BLOCKS["ir_no_skip"](), 7, 7, 4, seed=6, x_grad=True,
                             frozen=frozen, use_native=use_native)


STRIDE2 = [  # (block, h, w, r): fused where the grids line up, per layer where they do not
    ("tv", 7, 11, 2), ("tv", 7, 7, 4), ("tv", 9, 11, 2), ("tv", 14, 14, 4),
    ("timm_same", 14, 14, 4), ("timm_same", 8, 11, 2), ("timm_same", 9, 7, 2),
]
STRIDE2_CONV = {"tv": (3, False), "timm_same": (5, True)}  # dw kernel, TF 'same' padding


def _stride2_case_aligned(kind, h, w, r):
    k, tf_same = STRIDE2_CONV[kind]
    return _stride2_aligned(h, k, r, tf_same) and _stride2_aligned(w, k, r, tf_same)


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("kind,h,w,r", STRIDE2)
def test_stride2_block_matches_spec_oracle(kind, h, w, r, use_native):
    if kind == "tv":
        block = InvertedResidual(3, 5, stride=2, expand_ratio=4)
    else:
        block = timm_blocks.InvertedResidual(3, 5, dw_kernel_size=5, stride=2, exp_ratio=3.0,
                                             act_layer=nn.ReLU6, pad_type="same")
        assert isinstance(block.conv_dw, timm_layers.Conv2dSame)
    _check_against_reference(block, h, w, r, seed=h * w + r,
                             fused=_stride2_case_aligned(kind, h, w, r), use_native=use_native)


def test_stride2_cases_cover_both_paths():
    aligned = [_stride2_case_aligned(*case) for case in STRIDE2]
    assert any(aligned) and not all(aligned)
    assert aligned[3] and aligned[4]  # 14×14 → 7×7 at r=4: MobileNetV2's and Lite0's 224² maps
    assert aligned[5]  # an even map: TF 'same' pads 1 before and 2 after


# ----------------------------------------------------------------------------------------------
# Depthwise units whose conv runs inside the native statistics pass (float32, tiny maps)


def _dw_same_block():
    """A stride-1 depthwise unit with timm's TF 'same' padding (the conv pads the map itself:
    explicit padding in the native plan)."""
    conv = timm_layers.Conv2dSame(12, 12, 5, groups=12, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(12), nn.ReLU6())


def _units_of_any(block):
    """_units_of, and a plain nn.Sequential(conv, BatchNorm, activation) as one unit."""
    if isinstance(block, nn.Sequential) and not isinstance(block, Conv2dNormActivation):
        return [(block[0], block[1], block[2])]
    return _units_of(block)[0]


DW_BLOCKS = {
    "ir_skip": lambda: InvertedResidual(4, 4, stride=1, expand_ratio=6),  # 24 channels, k=3
    "dw3_bias_relu_12": lambda: Conv2dNormActivation(12, 12, kernel_size=3, groups=12,
                                                     activation_layer=nn.ReLU, bias=True),
    "timm_k5": lambda: timm_blocks.InvertedResidual(4, 4, dw_kernel_size=5, exp_ratio=4.0,
                                                    act_layer=nn.ReLU6),
    "dw5_same": _dw_same_block,
}
DW_CASES = [  # kind, h, w, r, whether the maps are tiny (≤ 256 pixels, ≤ 16 patches)
    ("ir_skip", 7, 7, 4, True), ("ir_skip", 14, 14, 4, True), ("ir_skip", 9, 11, 2, False),
    ("dw3_bias_relu_12", 16, 16, 4, True), ("dw3_bias_relu_12", 5, 13, 4, True),
    ("dw3_bias_relu_12", 3, 9, 2, True), ("timm_k5", 7, 7, 4, True), ("timm_k5", 11, 6, 4, True),
    ("dw5_same", 8, 10, 4, True), ("dw5_same", 16, 16, 2, False),
]


def _cpu_has_avx2_fma() -> bool:
    """Whether this CPU runs the native kernels' AVX2+FMA paths (x86 only)."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return platform.machine() in ("x86_64", "AMD64") and "avx2" in flags and "fma" in flags


@needs_native
@pytest.mark.usefixtures("simd")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind,h,w,r,tiny", DW_CASES)
def test_depthwise_conv_inside_the_native_stats_pass_matches_conv2d(kind, h, w, r, tiny,
                                                                    threads, simd):
    """Float32 fused blocks give the PyTorch reference path's outputs and gradients (conv2d),
    whether their depthwise units compute their conv inside the native statistics pass (tiny
    maps, on an x86 CPU with AVX2 and FMA) or call conv2d (other maps, the 4-lane and portable
    paths, other CPUs); the pass runs exactly where it should."""
    gen = torch.Generator().manual_seed(h * w + r)
    block = _randomise(DW_BLOCKS[kind](), gen)
    dw_units = sum(1 for c, _, _ in _units_of_any(block) if c.groups > 1)
    assert dw_units == 1
    model = _fused_copy(block, r)
    x = torch.randn(3, _convs(block)[0].in_channels, h, w, generator=gen) * 2  # 3: odd runs
    with torch.no_grad():
        g_out = torch.randn(block(x).shape, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    got = {}
    try:
        for inside in (False, True):  # the PyTorch reference path, then the native one
            passes = native.fused_dw_passes()
            xg = x.clone().requires_grad_()
            with _native_form(inside):
                y = model(xg)
                assert _node(y.grad_fn) == FUSED_NODE
                y.backward(g_out)
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            got[inside] = (y.detach(), xg.grad, grads, native.fused_dw_passes() - passes)
    finally:
        torch.set_num_threads(before)
    assert got[False][3] == 0
    assert got[True][3] == (dw_units if tiny and simd is True and _cpu_has_avx2_fma() else 0)
    assert _rel_err(got[True][0], got[False][0]) < 1e-5
    assert _rel_err(got[True][1], got[False][1]) < 1e-4
    for name, ref in got[False][2].items():
        assert _rel_err(got[True][2][name], ref) < 1e-4, name


# ----------------------------------------------------------------------------------------------
# Composition: fused blocks inside a prepared network, patch-constant gradients between them


def _model_grads(net, x, labels, seed):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout mask for both models
    F.cross_entropy(net(x), labels).backward()
    return {n: p.grad for n, p in net.named_parameters() if p.requires_grad}


def _record_outputs(net, names):
    """{block name: (output map size, output grad_fn)} filled by the next forward."""
    seen = {}
    for name in names:
        net.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: seen.__setitem__(name, (o.shape[-2:], o.grad_fn)))
    return seen


@pytest.mark.skipif(not native_buildable(), reason="no C++ toolchain for the kernels")
def test_the_next_fused_block_takes_its_input_sums_only_from_an_unchanged_output():
    """The native forward hands a fused block's output patch sums to the next fused block whose
    input is that tensor (it skips summing its input map). A forward hook that scales the output
    in place bumps its version: the next block must sum the changed map itself, or its x̃ and
    so its weight gradients would be the unscaled ones. Checked against the per-layer filtered
    network with the same hook, and by counting the hand-offs."""
    from gradfilter.models import create_model
    from gradfilter.train import prepare_model

    torch.manual_seed(0)
    x, labels = torch.randn(2, 3, 96, 96), torch.tensor([3, 7])
    net, info = prepare_model(create_model("mobilenet_v2", 10), "filtered", 2, 4, x)
    fused_net = copy.deepcopy(net)
    fused = fuse_blocks(fused_net, info.blocks)
    assert fused == info.blocks  # features.15 .. 18: three hand-offs per forward

    def hand_offs(model):
        before = native.fused_hand_offs()
        grads = _model_grads(model, x, labels, seed=1)
        return native.fused_hand_offs() - before, grads

    with native.use_native(True):
        count, _ = hand_offs(fused_net)
        assert count == len(fused) - 1
        for model in (net, fused_net):
            model.get_submodule(fused[1]).register_forward_hook(lambda m, a, o: o.mul_(1.5))
        ref = _model_grads(net, x, labels, seed=1)
        count, got = hand_offs(fused_net)
    assert count == len(fused) - 2  # not into the block after the hooked one
    for name in ref:  # tolerance relative to each gradient's scale (some are ~1e-5)
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


COMPOSE = [  # model, last N, input size, radius, its stride-2 block, whether that one runs fused
    ("mobilenet_v2", 5, 128, 2, "features.14", True),  # 8×8 → 4×4: the grids line up
    ("mobilenet_v2", 5, 160, 4, "features.14", False),  # 10×10 → 5×5: they do not
    ("tf_efficientnet_lite0", 8, 128, 2, "blocks.5.0", True),  # 8×8 → 4×4, TF 'same', k=5
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model_name,last,size,r,strided,strided_fused", COMPOSE)
def test_fused_network_matches_per_layer_filtered_network(model_name, last, size, r, strided,
                                                          strided_fused, dtype, device):
    """Between fused blocks and from the pooled head the gradient is patch-constant, so the
    fused network's gradients are the per-layer filtered network's. On a GPU (the fused blocks'
    PyTorch form) in float64 only: TF32 convolutions would set the float32 tolerance."""
    from gradfilter.models import create_model
    from gradfilter.train import prepare_model

    if device.type != "cpu" and dtype != torch.float64:
        pytest.skip("float64 only off the CPU")
    use_native = dtype == torch.float32 and device.type == "cpu"
    if use_native and not native_buildable():
        pytest.skip("no C++ toolchain for the kernels")
    torch.manual_seed(0)
    net = create_model(model_name, 10).to(dtype)
    x = torch.randn(2, 3, size, size, dtype=dtype)
    net, info = prepare_model(net, "filtered", r, last, x)
    net, x = net.to(device), x.to(device)
    fused_net = copy.deepcopy(net)
    fused = fuse_blocks(fused_net, info.blocks, on_unsupported="skip")
    assert len(fused) >= 5 and strided in fused and set(fused) <= set(info.blocks)
    head_fused = isinstance(fused_net, FusedHeadMixin)  # Lite0: conv_head → bn2 as one unit
    assert head_fused == ("conv_head" in fused)
    if head_fused:  # conv_head itself no longer runs: what reaches the pooling is the fused node
        fused.remove("conv_head")
        seen_head = {}
        fused_net.global_pool.register_forward_pre_hook(
            lambda m, a: seen_head.__setitem__("fn", _node(a[0].grad_fn)))
    seen = _record_outputs(fused_net, fused)
    labels = torch.tensor([3, 7], device=device)
    with native.use_native(use_native):
        ref = _model_grads(net, x, labels, seed=1)
        got = _model_grads(fused_net, x, labels, seed=1)
    assert min(min(size) for size, _ in seen.values()) >= 3
    ran_fused = {b for b, (_, fn) in seen.items() if _node(fn) == FUSED_NODE}
    assert ran_fused == set(fused) - ({strided} if not strided_fused else set())
    if head_fused:
        assert seen_head["fn"] == FUSED_NODE
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert set(got) == set(ref)
    for name in ref:
        err = _rel_err(got[name], ref[name])
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("model_name", ["mobilenet_v2", "tf_efficientnet_lite0"])
def test_fused_network_runs_on_a_non_cpu_device(model_name):
    """Off the CPU the fused blocks run their PyTorch form (the CUDA path; no GPU here): on the
    meta device a fused network's forward and backward give meta gradients of the parameters'
    shapes through fused nodes. A CPU tensor created inside that path and mixed with the map
    would raise here (meta ops check devices), as it would on a GPU."""
    from gradfilter.models import create_model
    from gradfilter.train import prepare_model

    torch.manual_seed(0)
    net = create_model(model_name, 10)
    net, info = prepare_model(net, "filtered", 4, 4, torch.randn(2, 3, 64, 64))
    fused = fuse_blocks(net, info.blocks, on_unsupported="skip")
    assert fused
    net = net.to("meta").train()
    seen = _record_outputs(net, [b for b in fused if b != "conv_head"])
    x = torch.randn(2, 3, 64, 64, device="meta")
    F.cross_entropy(net(x), torch.zeros(2, dtype=torch.long, device="meta")).backward()
    assert seen and all(_node(fn) == FUSED_NODE for _, fn in seen.values())
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.device.type == "meta", name
            assert p.grad.shape == p.shape, name


# ----------------------------------------------------------------------------------------------
# Native bn_act_stats against torch and explicit patch loops


def _stats_reference(z, scale, shift, upper, k, top, left, ph, pw):
    """(y, count, masked z sums, y sums, |masked z| sums, |y| sums); sums (C, N, ph, pw) in
    float64 from explicit patch loops."""
    v = z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if math.isnan(upper):
        y, mask = v, torch.ones_like(v, dtype=torch.bool)
    else:
        y, mask = torch.clamp(v, 0, upper), (v > 0) & (v < upper)
    mz = torch.where(mask, z, torch.zeros_like(z)).double()
    maps = [mask.double(), mz, y.double(), mz.abs(), y.double().abs()]
    n, c, h, w = z.shape
    sums = [torch.zeros(c, n, ph, pw, dtype=torch.float64) for _ in maps]
    for i in range(ph):
        r0, r1 = max(i * k - top, 0), min((i + 1) * k - top, h)
        for j in range(pw):
            c0, c1 = max(j * k - left, 0), min((j + 1) * k - left, w)
            if r0 < r1 and c0 < c1:
                for s, m in zip(sums, maps):
                    s[:, :, i, j] = m[:, :, r0:r1, c0:c1].sum((2, 3)).t()
    return (y, *sums)


def _assert_sums(got, ref, abs_ref, tol, what):
    got = got.double()
    assert torch.equal(got.isnan(), ref.isnan()), what
    inf = ref.isinf()
    assert torch.equal(got[inf], ref[inf]), what
    finite = ref.isfinite()
    bad = (got - ref).abs()[finite] > tol * (abs_ref[finite] + 1e-30)
    assert not bad.any(), f"{what}: {(got - ref).abs()[finite].max()}"


def _stats_case(n, c, h, w, k, top, left, ph, pw, upper, dtype, seed, specials=True):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * 4 + 2).to(dtype)
    scale = (torch.randn(c, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    shift = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    scale[0], shift[0] = 1.0, 0.0  # v = z: exact 0 and 6 reach the mask's edges
    if c > 1:
        scale[1], shift[1] = 2.0, -6.0  # z = 3 → v = 0, z = 6 → v = 6 exactly
    if specials:
        flat = z.view(-1)
        picks = torch.randperm(flat.numel(), generator=gen)
        values = [0.0, 6.0, -0.0, 3.0, 6.0, 0.0, 3.0, math.nan, math.inf, -math.inf]
        for i, val in zip(picks[: 3 * len(values)].tolist(), values * 3):
            flat[i] = val
        # the edge values where they meet channels 0 and 1
        z[:, 0, 0, :] = torch.tensor([0.0, 6.0, -0.0, 5.5, 6.5], dtype=dtype).repeat(w)[:w]
        if c > 1:
            z[:, 1, -1, :] = torch.tensor([3.0, 6.0, 2.5, 5.0], dtype=dtype).repeat(w)[:w]
    with native.use_native(True):
        got = native.bn_act_stats(z, scale, shift, upper, k, top, left, ph, pw)
        got_u8 = native.bn_act_stats(z, scale, shift, upper, k, top, left, ph, pw, count_u8=True)
    y_ref, count, mz, ys, mz_abs, ys_abs = _stats_reference(z, scale, shift, upper, k, top, left,
                                                            ph, pw)
    y = got[0]
    assert y.shape == z.shape and y.dtype == dtype
    nan = y_ref.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan], y_ref[~nan])  # bit for bit (±0 compare equal)
    for t in got[1:]:
        assert t.shape == (c, n, ph, pw) and t.dtype == dtype
    assert torch.equal(got[1].double(), count)  # small integers: exact
    assert got_u8[1].dtype == torch.uint8 and torch.equal(got_u8[1].double(), count)
    for a, b in zip((got_u8[0], *got_u8[2:]), (got[0], *got[2:])):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())  # the same pass otherwise
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    _assert_sums(got[2], mz, mz_abs, tol, "masked z sums")  # masked-out NaN/inf z: not in
    _assert_sums(got[3], ys, ys_abs, tol, "y sums")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("upper", [6.0, math.inf, math.nan])
@pytest.mark.parametrize("shape", [
    (2, 12, 7, 7, 4, 1, 1, 2, 2),  # tiny, whole blocks of 8 planes (SIMD path)
    (3, 5, 7, 7, 4, 1, 1, 2, 2),  # tiny, 15 planes: one block of 8 and 7 left over
    (2, 8, 9, 11, 3, -1, 2, 3, 4),  # tiny, negative top
    (1, 16, 7, 7, 2, 1, 1, 4, 4),  # tiny, 16 patches
    # narrow tiny planes, 8 channels at a time, row by row (AVX2): widths 16, 8 and 3 (the
    # plane's last rows through masked loads/stores), patch rows with no map rows
    (2, 8, 16, 16, 4, 0, 0, 4, 4),
    (1, 16, 8, 8, 4, 0, 0, 2, 2),
    (3, 8, 5, 3, 2, 1, 0, 4, 2),
    (2, 8, 6, 13, 4, 6, 0, 3, 4),
    # planes smaller than a vector: the last row's vector may run on into the next planes of
    # the block of 8 only while they are still to be done (1×1: not from the last seven)
    (2, 16, 1, 1, 1, 0, 0, 1, 1),
    (2, 16, 1, 2, 1, 0, 0, 1, 2),
    (1, 24, 2, 3, 2, 1, 1, 2, 2),
    (2, 8, 5, 20, 4, 1, 2, 2, 6),  # tiny but wider than 16: one plane at a time, row by row
    (2, 3, 20, 23, 2, 0, 1, 10, 12),  # not tiny
    (2, 9, 20, 23, 3, 2, -2, 8, 7),
    (1, 5, 20, 23, 4, -3, 3, 6, 7),  # grid ends before the map
    (2, 4, 20, 23, 4, 2, 3, 6, 7),
])
@pytest.mark.usefixtures("simd")
def test_native_bn_act_stats_matches_reference(shape, upper, dtype):
    _stats_case(*shape, upper, dtype, seed=sum(shape))
    _stats_case(*shape, upper, dtype, seed=sum(shape) + 1, specials=False)


@needs_native
@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("shape", [
    (5, 17, 7, 7, 4, 1, 1, 2, 2),  # tiny: batch split into per-thread runs of samples
    (7, 9, 20, 23, 3, 2, -2, 8, 7),  # not tiny
    (2, 8, 14, 14, 4, 1, 1, 4, 4),  # fewer samples than threads
])
def test_native_bn_act_stats_any_thread_count(shape, threads):
    """The pass splits the batch into one run of samples per thread (uneven where the batch
    does not divide): every sample and channel still reaches the sums exactly once."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _stats_case(*shape, 6.0, torch.float32, seed=threads + sum(shape), specials=False)
    finally:
        torch.set_num_threads(before)


@needs_native
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 11), h=st.integers(1, 24), w=st.integers(1, 24),
       k=st.integers(1, 5), upper=st.sampled_from([6.0, math.inf, math.nan]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
       data=st.data())
def test_native_bn_act_stats_random_grids(n, c, h, w, k, upper, dtype, seed, data):
    top, left = data.draw(st.integers(-k, k)), data.draw(st.integers(-k, k))
    ph = data.draw(st.integers(1, _ceil_div(h + max(top, 0), k) + 1))
    pw = data.draw(st.integers(1, _ceil_div(w + max(left, 0), k) + 1))
    _stats_case(n, c, h, w, k, top, left, ph, pw, upper, dtype, seed,
                specials=data.draw(st.booleans()))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count_u8", [True, False])
@pytest.mark.parametrize("with_mz", [True, False])
@pytest.mark.parametrize("gscale", [1.0, 0.25])
@pytest.mark.usefixtures("simd")
def test_native_unit_backward_matches_the_formulas(dtype, count_u8, with_mz, gscale):
    """One fused unit's backward before its products, against its formulas written out in
    float64: ḡ = g·|m|·s/n·gscale, γ: Σ g·(Σm·z − μ|m|)/σ, β: Σ g·|m|, bias: Σ g·|m|·s."""
    gen = torch.Generator().manual_seed(int(count_u8) + 2 * int(with_mz) + 4 * int(gscale == 1))
    c, m = 13, 37  # not multiples of the vector width
    g = torch.randn(c, m, generator=gen, dtype=torch.float64)
    count = torch.randint(0, 17, (c, m), generator=gen)
    mz = torch.randn(c, m, generator=gen, dtype=torch.float64) * 3
    scale, inv_std = torch.randn(c, generator=gen, dtype=torch.float64), torch.rand(
        c, generator=gen, dtype=torch.float64) + 0.1
    mean = torch.randn(c, generator=gen, dtype=torch.float64)
    per_pixel = torch.randint(1, 17, (1, m), generator=gen).double()
    cnt = count.double()
    ref = (g * cnt * scale[:, None] / per_pixel * gscale,
           (g * (mz - mean[:, None] * cnt)).sum(1) * inv_std if with_mz else torch.zeros(c),
           (g * cnt).sum(1), (g * cnt * scale[:, None]).sum(1))
    with native.use_native(True):
        got = native.unit_backward(g.to(dtype), count.to(torch.uint8 if count_u8 else dtype),
                                   mz.to(dtype) if with_mz else None, scale.to(dtype),
                                   inv_std.to(dtype), mean.to(dtype), per_pixel.to(dtype), gscale)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * 10)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_block_in_half_precision_is_near_the_float32_per_layer_block(dtype):
    """A fused block in bfloat16 / float16 (the native passes accumulate in float32): its
    gradients near the float32 per-layer filtered block's, with a loss whose gradient at the
    block output is constant over the map (so the two agree exactly in exact arithmetic)."""
    torch.manual_seed(0)
    base = nn.Sequential(InvertedResidual(16, 16, 1, 6)).eval()
    _fit_batchnorm(base, bias=(-0.5, 0.5))
    per_layer = copy.deepcopy(base)
    gradfilter.apply(per_layer, radius=2, names="0.*")
    fused = copy.deepcopy(per_layer)
    fuse_blocks(fused, ["0"])
    fused = fused.to(dtype)
    x = torch.randn(2, 16, 8, 8)
    grads = []
    with native.use_native(True):
        for net, d in ((per_layer, torch.float32), (fused, dtype)):
            xi = x.to(d, copy=True).requires_grad_()
            net(xi).float().mean((2, 3)).square().sum().backward()
            grads.append([xi.grad.float()] + [p.grad.float() for p in net.parameters()])
    # 8 / 11 significant bits. bfloat16 reads 2.5-4.5% on BatchNorm's weight gradient (the
    # per-layer block in bfloat16: 1.8%): it is a difference of two patch sums kept in bfloat16
    tol = 0.06 if dtype == torch.bfloat16 else 0.01
    for want, got in zip(*grads):
        assert want.norm() > 0
        assert (got - want).norm() <= tol * want.norm(), (got - want).norm() / want.norm()


@needs_native
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_native_bn_affine_matches_the_formulas(stats_dtype, out_dtype, affine):
    """scale γ/σ, shift β − μγ/σ, 1/σ with σ = sqrt(var + eps), against float64 formulas
    (γ = 1, β = 0 without affine parameters)."""
    gen = torch.Generator().manual_seed(int(affine) + 2 * (stats_dtype == torch.float64))
    c = 37
    mean = torch.randn(c, generator=gen, dtype=torch.float64) * 3
    var = torch.rand(c, generator=gen, dtype=torch.float64) * 4
    var[0] = 0.0  # eps alone keeps σ finite
    weight = torch.randn(c, generator=gen, dtype=torch.float64) if affine else None
    bias = torch.randn(c, generator=gen, dtype=torch.float64) if affine else None
    eps = 1e-3
    inv = (var + eps).rsqrt()
    scale = inv * (weight if affine else 1.0)
    shift = (bias if affine else 0.0) - mean * scale
    with native.use_native(True), torch.no_grad():  # as in a fused block's forward
        got = native.bn_affine(mean.to(stats_dtype), var.to(stats_dtype),
                               None if weight is None else nn.Parameter(weight.to(stats_dtype)),
                               None if bias is None else bias.to(stats_dtype), eps, out_dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}
    rtol = max(tol[stats_dtype], tol[out_dtype])
    for a, b in zip(got, (scale, shift, inv)):
        assert a.dtype == out_dtype
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * 10)


@needs_native
def test_native_bn_act_stats_rejects_bad_arguments():
    z = torch.randn(1, 3, 5, 5)
    s = torch.ones(3)
    with native.use_native(True):
        with pytest.raises(RuntimeError, match="upper bound"):
            native.bn_act_stats(z, s, s, 0.0, 2, 0, 0, 3, 3)
        with pytest.raises(RuntimeError, match="scale and shift"):
            native.bn_act_stats(z, torch.ones(2), s, 6.0, 2, 0, 0, 3, 3)
        with pytest.raises(RuntimeError, match="4-D"):
            native.bn_act_stats(z[0], s, s, 6.0, 2, 0, 0, 3, 3)
        with pytest.raises(RuntimeError, match=r"byte counts need k\*k <= 255"):
            native.bn_act_stats(z, s, s, 6.0, 16, 0, 0, 1, 1, count_u8=True)


# ----------------------------------------------------------------------------------------------
# Errors, surgery, forward outputs, saved bytes


def test_resnet_basic_block_named_exactly_is_refused_with_the_reason():
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    gradfilter.apply(model, radius=2, names="layer4.*")
    with pytest.raises(ValueError, match=r"cannot fuse layer4\.0: BasicBlock is not a supported"):
        fuse_blocks(model, ["layer4.0"])
    with pytest.raises(ValueError, match=r"no block .* can be fused(.|\n)*layer4\.1: BasicBlock"):
        fuse_blocks(model, ["layer4.0", "layer4.1"], on_unsupported="skip")
    with pytest.raises(ValueError, match="no block .* can be fused"):
        fuse_blocks(model, "layer4.?")  # glob matches only
    # (a glob over everything fuses layer4.0.downsample, a strided conv + BatchNorm Sequential)
    with pytest.raises(ValueError, match="on_unsupported"):
        fuse_blocks(model, "layer4.0", on_unsupported="ignore")
    assert not any(isinstance(m, FusedBlockMixin) for m in model.modules())


def test_unfiltered_block_is_refused_mentioning_apply():
    model = nn.Sequential(InvertedResidual(4, 4, 1, 6).eval())
    with pytest.raises(ValueError, match=r"cannot fuse 0: .*gradfilter\.apply"):
        fuse_blocks(model, ["0"])


def _filtered(block, r=2, **kw):
    model = nn.Sequential(block)
    gradfilter.apply(model, radius=r, **kw)
    gradfilter.freeze(model, trainable=lambda n, m: True)
    return model


@pytest.mark.parametrize("make,reason", [
    (lambda: Conv2dNormActivation(4, 4, 3, stride=3), "stride"),
    (lambda: Conv2dNormActivation(4, 4, 3, dilation=2), "dilation"),
    (lambda: Conv2dNormActivation(4, 4, 3, activation_layer=nn.Hardswish), "Hardswish"),
    (lambda: Conv2dNormActivation(4, 6, 3, groups=2), "groups"),
    (lambda: Conv2dNormActivation(4, 4, 2), r"\(2, 2\)"),  # even kernel
    (lambda: Conv2dNormActivation(4, 4, 3, padding=0), "padding"),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
     "running statistics"),
    (lambda: timm_blocks.InvertedResidual(4, 4, exp_ratio=2.0, drop_path_rate=0.1),
     "drop_path"),
])
def test_unsupported_blocks_are_refused_and_skip_mode_leaves_them(make, reason):
    block = make()
    model = _filtered(block)
    model.append(Conv2dNormActivation(_convs(block)[-1].out_channels, 4, 1))  # a fusable neighbour
    gradfilter.apply(model, radius=2, names="1.*")
    assert fusable(model[0]) is not None and fusable(model[1]) is None
    with pytest.raises(ValueError, match=f"cannot fuse 0: .*{reason}"):
        fuse_blocks(model, ["0", "1"])
    assert fuse_blocks(model, ["0", "1"], on_unsupported="skip") == ["1"]
    assert type(model[0]) is type(block) and isinstance(model[1], FusedBlockMixin)


def test_mixed_radii_and_exact_input_grad_are_refused():
    model = _filtered(InvertedResidual(4, 4, 1, 6), r={"0.conv.0.*": 2, "0.conv.[12]*": 4})
    assert "different radii" in fusable(model[0])
    model = _filtered(InvertedResidual(4, 4, 1, 6), input_grad="exact")
    assert "input_grad='exact'" in fusable(model[0])


def test_remove_restores_the_block_and_outputs_match():
    gen = torch.Generator().manual_seed(3)
    plain = _randomise(InvertedResidual(8, 8, 1, 6), gen)
    keys = {k: v.clone() for k, v in plain.state_dict().items()}
    model = _filtered(copy.deepcopy(plain), r=4)
    assert fuse_blocks(model, ["0"]) == ["0"]
    assert type(model[0]).__name__ == "FusedInvertedResidual"
    x = torch.randn(2, 8, 14, 14, generator=gen)

    with torch.no_grad():  # no grad: the block's own forward, bit for bit
        assert torch.equal(model(x), plain(x))
    xg = x.clone().requires_grad_()
    y = model(xg)
    assert _node(y.grad_fn) == FUSED_NODE
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)

    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), xg, create_graph=True)

    model[0].train()  # freeze pinned BatchNorm to eval: still fused
    assert _node(model(xg).grad_fn) == FUSED_NODE
    training = copy.deepcopy(model)
    training[0].conv[0][1].training = True  # BatchNorm in training mode: the per-layer forward
    assert _node(training(xg).grad_fn) != FUSED_NODE
    for p in model.parameters():  # nothing needs a gradient: the block's own forward
        p.requires_grad_(False)
    assert model(x).grad_fn is None

    removed = gradfilter.remove(model)
    assert "0" in removed
    block = model[0]
    assert type(block) is InvertedResidual
    assert not hasattr(block, "_gradfilter_units")
    assert not any(type(m).__name__.startswith("Filtered") for m in block.modules())
    state = block.state_dict()
    assert list(state) == list(keys)
    assert all(torch.equal(state[k], keys[k]) for k in keys)
    with torch.no_grad():
        assert torch.equal(block(x), plain(x))


@pytest.mark.parametrize("use_native", NATIVE)
def test_fused_block_under_autocast_runs_per_layer(use_native):
    """Under autocast a fused block runs per layer (its filtered convs cast as autocast would;
    the fused node computes in the map's dtype and mixed it with float32 weights in its
    backward): the unfused block's outputs and gradients exactly; without autocast, the node."""
    gen = torch.Generator().manual_seed(7)
    block = _randomise(InvertedResidual(8, 8, 1, 6), gen)
    fused = _fused_copy(block, 4)
    per_layer = nn.Sequential(copy.deepcopy(block))
    gradfilter.apply(per_layer, radius=4)
    gradfilter.freeze(per_layer, trainable=lambda n, m: True)
    x = torch.randn(2, 8, 14, 14, generator=gen)
    with _native_form(use_native):
        plain = fused(x)
        assert _node(plain.grad_fn) == FUSED_NODE
        outs = []
        for model in (fused, per_layer):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(x)
            assert _node(y.grad_fn) != FUSED_NODE
            y.float().square().sum().backward()
            outs.append((y, {n: p.grad for n, p in model.named_parameters()}))
    (y_f, g_f), (y_p, g_p) = outs
    assert not torch.equal(y_f, plain)  # the convolutions ran in bfloat16
    assert torch.equal(y_f, y_p) and set(g_f) == set(g_p)
    for n in g_p:
        assert g_f[n].dtype == torch.float32 and torch.equal(g_f[n], g_p[n]), n


@pytest.mark.parametrize("use_native", NATIVE)
def test_fused_block_copies_after_training_and_catches_in_place_weight_changes(use_native):
    """A trained fused model (its geometry and native plan caches filled) deep-copies into one
    that computes the same gradients; a weight changed in place between forward and backward
    is caught, as autograd catches it for any op that saved it."""
    gen = torch.Generator().manual_seed(5)
    model = _fused_copy(_randomise(InvertedResidual(8, 8, 1, 6), gen), 4)
    x = torch.randn(2, 8, 14, 14, generator=gen)
    with _native_form(use_native):
        model(x).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        clone = copy.deepcopy(model)
        clone.zero_grad(set_to_none=True)
        y = clone(x)
        assert _node(y.grad_fn) == FUSED_NODE
        y.sum().backward()
        for n, p in clone.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=0, msg=n)
        y = model(x)
        with torch.no_grad():
            model[0].conv[2].weight.mul_(2)  # the last 1×1 conv: its W̃ carries g̃x
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


_LOAD_AND_TRAIN = """
import sys, torch, torch.nn.functional as F
import gradfilter._mixed
model_path, data_path, out_path, fused_class, threads = sys.argv[1:]
torch.set_num_threads(int(threads))  # the parent's threading, set explicitly as it was there
assert not gradfilter._mixed._CLASSES  # no class made at run time exists yet
net = torch.load(model_path, weights_only=False)
assert type(net).__name__ == fused_class, type(net)
net.train()  # BatchNorm stays pinned to eval (freeze's protocol) in the loaded model
assert not any(m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
net.eval()
x, y = torch.load(data_path)
F.cross_entropy(net(x), y).backward()
torch.save({n: p.grad for n, p in net.named_parameters() if p.requires_grad}, out_path)
"""


@pytest.mark.parametrize("model_name,fused_class", [("mobilenet_v2", "FusedMobileNetV2"),
                                                    ("tf_efficientnet_lite0", "FusedEfficientNet")])
def test_trained_fused_model_saved_whole_loads_in_a_fresh_process(tmp_path, model_name,
                                                                   fused_class):
    """``torch.save(model)`` of a slimmed, fused model (classes made at run time, native plans
    cached) works, and a fresh process, where those classes do not exist yet, loads it and
    computes the same gradients, bit for bit. The child sets the parent's thread count
    explicitly as conftest did there: a process that never called ``torch.set_num_threads``
    lets MKL pick its GEMMs' threads per call, which sums the fused backward's products in
    another order (~5e-7 relative) even at the same thread count."""
    import subprocess
    import sys

    from gradfilter.models import create_model
    from gradfilter.train import prepare_model

    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    net, info = prepare_model(create_model(model_name, 10), "fused", 4, 4, x)
    assert type(net).__name__ == fused_class and info.fused
    net.eval()  # no dropout: both processes' steps are deterministic (fused blocks still run)
    F.cross_entropy(net(x), y).backward()  # fills the geometry and native plan caches
    net.zero_grad(set_to_none=True)
    torch.save(net, tmp_path / "model.pt")
    torch.save((x, y), tmp_path / "data.pt")
    F.cross_entropy(net(x), y).backward()
    want = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    subprocess.run([sys.executable, "-c", _LOAD_AND_TRAIN, str(tmp_path / "model.pt"),
                    str(tmp_path / "data.pt"), str(tmp_path / "grads.pt"), fused_class,
                    str(torch.get_num_threads())], check=True)
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert want and set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), (n, (got[n] - want[n]).abs().max().item())


def test_fused_block_saves_patch_resolution_tensors():
    """r=4 on a 14×14 map: the per-layer filtered block still keeps BatchNorm's and ReLU6's
    full-resolution maps; the fused one keeps patch-resolution sums only."""
    r = 4
    gen = torch.Generator().manual_seed(4)
    plain = _randomise(InvertedResidual(32, 32, 1, 6), gen)
    per_layer = _filtered(copy.deepcopy(plain), r=r)
    fused = copy.deepcopy(per_layer)
    fuse_blocks(fused, ["0"])
    x = torch.randn(2, 32, 14, 14, generator=gen, requires_grad=True)
    hidden_map = 2 * 192 * 14 * 14 * 4  # one float32 expanded map
    for use in ([False, True] if native_buildable() else [False]):
        with native.use_native(use):
            saved = []
            for model in (per_layer, fused):
                with gradfilter.count_saved(model.parameters(), model=model) as s:
                    y = model(x)
                saved.append(s.bytes)
                assert s.bytes_under(["0"]) == s.bytes
            assert _node(y.grad_fn) == FUSED_NODE
            # currently ~1.31 MB vs ~125 kB (10.5×); one more full-resolution float map in
            # the fused block would bring the ratio under r²/4 = 4
            assert saved[0] >= r * r / 4 * saved[1], saved
            assert saved[1] < hidden_map, saved


def test_globs_fuse_outermost_blocks_and_refitting_says_already_fused():
    model = _filtered(InvertedResidual(4, 4, 1, 6))
    model.append(InvertedResidual(4, 4, 1, 6).eval())
    gradfilter.apply(model, radius=2, names="1.*")
    # "*" matches every sub-module too: a unit inside a fused block must not be fused on its own
    assert fuse_blocks(model, "*") == ["0", "1"]
    assert not any(isinstance(m, FusedBlockMixin) for m in model[0].modules() if m is not model[0])
    with pytest.raises(ValueError, match="cannot fuse 0: already fused"):
        fuse_blocks(model, ["0"])
    with pytest.raises(ValueError, match=r"cannot fuse 1\.conv\.0: inside a fused block"):
        fuse_blocks(model, ["1.conv.0"])
    with pytest.raises(ValueError, match="no block .* can be fused(.|\n)*0: already fused"):
        fuse_blocks(model, ["0", "1"], on_unsupported="skip")
    with pytest.raises(ValueError, match=r"1\.conv\.0: inside a fused block"):
        fuse_blocks(model, ["1.conv.0"], on_unsupported="skip")


def test_pure_torch_stats_ignore_infinite_inputs_outside_the_mask():
    from gradfilter import functional as GF
    from gradfilter.blocks.reference import unit_stats as _unit_stats

    z = torch.tensor([[[[1.0, -math.inf], [2.0, math.inf]]]])  # one 2×2 patch
    gh = gw = GF.axis_geometry(2, 2, kernel=1, stride=1, dilation=1, radius=2)
    one, zero = torch.ones(1), torch.zeros(1)
    with native.use_native(False):
        y, count, mz, ys = _unit_stats(z, one, zero, 6.0, gh, gw)
    # ReLU6 passes 1 and 2 only; -inf (below) and +inf (above) are outside the mask
    assert count.item() == 2 and mz.item() == 3.0 and ys.item() == 9.0


def test_channels_last_block_runs_the_per_layer_path():
    """``--channels-last --method fused``: channels-last maps take the per-layer path (whose
    native kernels cover NHWC) with its values, and keep their layout."""
    gen = torch.Generator().manual_seed(5)
    plain = _filtered(_randomise(InvertedResidual(16, 16, 1, 6), gen), r=4).double()
    fused = copy.deepcopy(plain)
    fuse_blocks(fused, ["0"])
    cl = torch.channels_last
    x = torch.randn(4, 16, 14, 14, generator=gen, dtype=torch.float64).to(memory_format=cl)
    g = torch.randn(4, 16, 14, 14, generator=gen, dtype=torch.float64)
    results = []
    for net in (plain.to(memory_format=cl), fused.to(memory_format=cl)):
        xg = x.clone().requires_grad_()
        y = net(xg)
        assert _node(y.grad_fn) != FUSED_NODE
        (y * g).sum().backward()
        assert y.is_contiguous(memory_format=cl) and xg.grad.is_contiguous(memory_format=cl)
        results.append([y, xg.grad, *(p.grad for p in net.parameters())])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the same block on a plain-layout map is fused
    assert _node(fused(x.contiguous().requires_grad_()).grad_fn) == FUSED_NODE


def _lite0_tail(dtype=torch.float64, act=None):
    """EfficientNet-Lite0 (random weights) prepared to train its last 2 blocks: blocks.6.0 and
    conv_head, whose bn2 carries ``act`` if given."""
    from gradfilter.models import create_model
    from gradfilter.train import prepare_model

    torch.manual_seed(0)
    net = create_model("tf_efficientnet_lite0", 10).to(dtype)
    if act is not None:
        net.bn2.act = act
    _fit_batchnorm(net)
    x = torch.randn(2, 3, 96, 96, dtype=dtype)
    net, info = prepare_model(net, "filtered", 2, 2, x)
    assert info.blocks == ["blocks.6.0", "conv_head"]
    return net, x


def test_efficientnet_head_fuses_exactly_and_remove_restores_it():
    """conv_head → bn2 (ReLU6) fused: the pooled head's gradient is constant over the map, so
    every gradient equals the per-layer filtered network's."""
    net, x = _lite0_tail()
    fused_net = copy.deepcopy(net)
    assert fuse_blocks(fused_net, ["conv_head"]) == ["conv_head"]
    assert isinstance(fused_net, FusedHeadMixin)
    assert type(fused_net).__name__ == "FusedEfficientNet"
    labels = torch.tensor([3, 7])
    ref = _model_grads(net, x, labels, seed=1)
    calls, fed = [], []
    fused_net.bn2.register_forward_hook(lambda *a: calls.append(1))  # bn2 runs inside the node
    fused_net.classifier.register_forward_pre_hook(
        lambda m, a: fed.append(_node(a[0].grad_fn)))
    got = _model_grads(fused_net, x, labels, seed=1)
    assert not calls
    assert fed == [FUSED_NODE]  # pooled inside the fused node: no map, no pooling op
    assert set(got) == set(ref) and "conv_head.weight" in got
    for name in ref:
        assert _rel_err(got[name], ref[name]) < 1e-12, name
    with torch.no_grad():  # no grad: timm's own forward, bit for bit
        assert torch.equal(fused_net(x), net(x))
        assert calls
    with pytest.raises(ValueError, match="cannot fuse conv_head: already fused"):
        fuse_blocks(fused_net, ["conv_head"])
    gradfilter.remove(fused_net)
    from timm.models.efficientnet import EfficientNet

    assert type(fused_net) is EfficientNet and "_gradfilter_units" not in fused_net.__dict__
    assert "_gradfilter_pool" not in fused_net.__dict__


def test_efficientnet_head_hooked_pooling_keeps_the_map_and_the_gradients():
    """A hook on the global pooling must see the map: the fused head then hands the map to
    timm's pooling, with the same gradients."""
    net, x = _lite0_tail()
    fused_net = copy.deepcopy(net)
    fuse_blocks(fused_net, ["conv_head"])
    labels = torch.tensor([3, 7])
    ref = _model_grads(net, x, labels, seed=1)
    maps = []
    fused_net.global_pool.register_forward_pre_hook(lambda m, a: maps.append(a[0].shape))
    got = _model_grads(fused_net, x, labels, seed=1)
    assert maps == [(2, 1280, 3, 3)]
    for name in ref:
        assert _rel_err(got[name], ref[name]) < 1e-12, name


def _mobilenet_v2_tail(dtype=torch.float64, size=128, r=2):
    """torchvision MobileNetV2 (random weights, fitted-looking BatchNorm statistics) prepared to
    train its last 2 blocks, features.17 and features.18 (320 → 1280, BatchNorm, ReLU6)."""
    from gradfilter.models import create_model
    from gradfilter.train import prepare_model

    torch.manual_seed(0)
    net = create_model("mobilenet_v2", 10).to(dtype)
    _fit_batchnorm(net, bias=(-0.2, 0.4))
    x = torch.randn(2, 3, size, size, dtype=dtype)
    net, info = prepare_model(net, "filtered", r, 2, x)
    assert info.blocks == ["features.17", "features.18"]
    return net, x


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("size,r", [(128, 2), (96, 2), (160, 4)])
def test_mobilenet_v2_pools_inside_its_fused_last_block_exactly(use_native, size, r):
    """features.18 fused: the model takes the global average from the fused node (4×4, 3×3,
    5×5 maps; grids that fit them and one that overhangs) and its backward gets g/(H·W) per
    patch. That is the per-layer filtered network's gradient exactly."""
    net, x = _mobilenet_v2_tail(size=size, r=r)
    fused_net = copy.deepcopy(net)
    assert fuse_blocks(fused_net, ["features.17", "features.18"]) == ["features.17",
                                                                       "features.18"]
    assert isinstance(fused_net, FusedPoolMixin)
    assert type(fused_net).__name__ == "FusedMobileNetV2"
    fed = []
    fused_net.classifier.register_forward_pre_hook(
        lambda m, a: fed.append((_node(a[0].grad_fn), a[0].shape)))
    labels = torch.tensor([3, 7])
    with _native_form(use_native):
        ref = _model_grads(net, x, labels, seed=1)
        got = _model_grads(fused_net, x, labels, seed=1)
        torch.manual_seed(2)
        want = net(x)
        torch.manual_seed(2)
        out = fused_net(x)
    assert fed == [(FUSED_NODE, (2, 1280))] * 2
    assert _rel_err(out.detach(), want.detach()) < 1e-12  # the same dropout mask: contiguous
    assert set(got) == set(ref) and "features.18.0.weight" in got
    for name in ref:
        err = _rel_err(got[name], ref[name])
        assert err < 1e-10, f"{name}: relative error {err:.2e}"


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("size", [224, 448, 576])
def test_mobilenet_v2_pooled_fused_block_in_float32_is_near_the_float64_network(size):
    """The float32 native kernels on the pooled path (7×7, 14×14 and 18×18 head maps: the
    narrow-plane and wide-row passes; the last unit's map is never written): gradients within
    float32 rounding of the per-layer filtered network in float64."""
    net, x = _mobilenet_v2_tail(size=size, r=4)
    fused_net = copy.deepcopy(net).float()
    fuse_blocks(fused_net, ["features.17", "features.18"])
    labels = torch.tensor([3, 7])
    with native.use_native(True):
        ref = _model_grads(net, x, labels, seed=1)
        got = _model_grads(fused_net, x.float(), labels, seed=1)
    assert set(got) == set(ref) and "features.18.1.weight" in got
    for name in ref:
        err = _rel_err(got[name].double(), ref[name])
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_mobilenet_v2_hooked_last_block_keeps_the_map_and_remove_restores_the_model():
    from torchvision.models import MobileNetV2

    net, x = _mobilenet_v2_tail()
    fused_net = copy.deepcopy(net)
    fuse_blocks(fused_net, ["features.17", "features.18"])
    labels = torch.tensor([3, 7])
    ref = _model_grads(net, x, labels, seed=1)
    maps = []
    for hooked in (fused_net.features[-1], fused_net.features):
        maps.clear()
        handle = hooked.register_forward_hook(lambda m, a, o: maps.append(o.shape))
        got = _model_grads(fused_net, x, labels, seed=1)
        handle.remove()
        assert maps == [(2, 1280, 4, 4)]
        for name in ref:
            assert _rel_err(got[name], ref[name]) < 1e-10, name
    fused_net.eval()
    with torch.no_grad():  # no grad: torchvision's forward, bit for bit
        assert torch.equal(fused_net(x), net.eval()(x))
    with pytest.raises(ValueError, match="already fused"):
        fuse_blocks(fused_net, ["features.18"])
    gradfilter.remove(fused_net)
    assert type(fused_net) is MobileNetV2 and type(fused_net.features[-1]) is Conv2dNormActivation


def test_efficientnet_head_with_unsupported_activation_is_refused_with_the_reason():
    net, _ = _lite0_tail(act=nn.SiLU())
    with pytest.raises(ValueError, match=r"cannot fuse conv_head: head conv_head → bn2: "
                                         r"activation SiLU"):
        fuse_blocks(net, ["conv_head"])
    assert fuse_blocks(net, ["blocks.6.0", "conv_head"], on_unsupported="skip") == ["blocks.6.0"]
    assert not isinstance(net, FusedHeadMixin)
