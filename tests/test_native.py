"""Native kernels, the tiny-map GEMM path and the allocator switch, against loop oracles."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import native_buildable
from hypothesis import given, settings
from hypothesis import strategies as st

from gradfilter import functional as GF
from gradfilter import native, patches

needs_native = pytest.mark.skipif(not native_buildable(), reason="no C++ toolchain for the kernels")


def _loop_patch_sum(x, kh, kw, top, left, ph, pw):
    """Oracle: explicit loops over patches, float64."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, ph, pw, dtype=torch.float64)
    for i in range(ph):
        for j in range(pw):
            r0, r1 = max(i * kh - top, 0), min((i + 1) * kh - top, h)
            c0, c1 = max(j * kw - left, 0), min((j + 1) * kw - left, w)
            if r0 < r1 and c0 < c1:
                out[:, :, i, j] = x[:, :, r0:r1, c0:c1].double().sum((2, 3))
    return out


def _loop_unpool(g, h, w, kh, kw, top, left):
    n, c, ph, pw = g.shape
    out = torch.zeros(n, c, h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            i, j = y + top, x + left
            if 0 <= i < ph * kh and 0 <= j < pw * kw:
                out[:, :, y, x] = g[:, :, i // kh, j // kw].double()
    return out


@st.composite
def grids(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    top, left = draw(st.integers(-kh, kh - 1)), draw(st.integers(-kw, kw - 1))
    ph, pw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return n, c, h, w, kh, kw, top, left, ph, pw


@needs_native
@settings(max_examples=80, deadline=None)
@given(grids(), st.sampled_from([torch.float32, torch.float64]))
@pytest.mark.usefixtures("simd")
def test_native_patch_sum_and_unpool_match_loops(grid, dtype):
    n, c, h, w, kh, kw, top, left, ph, pw = grid
    x = torch.randn(n, c, h, w, dtype=dtype)
    g = torch.randn(n, c, ph, pw, dtype=dtype)
    with native.use_native(True):
        sums = native.patch_sum(x, kh, kw, top, left, ph, pw)
        up = native.unpool(g, h, w, kh, kw, top, left)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(sums.double(), _loop_patch_sum(x, kh, kw, top, left, ph, pw),
                               rtol=tol, atol=tol)
    assert torch.equal(up.double(), _loop_unpool(g, h, w, kh, kw, top, left))


@settings(max_examples=60, deadline=None)
@given(grids())
def test_tiny_gemm_pool_and_unpool_match_loops(grid):
    n, c, h, w, kh, kw, top, left, ph, pw = grid
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    with native.use_native(False):
        sums = patches.fast_patch_sum(x, kh, kw, top, left, ph, pw)
    if patches._tiny(h * w, ph * pw):
        torch.testing.assert_close(sums, _loop_patch_sum(x, kh, kw, top, left, ph, pw))
        k = patches._pool_matrix(h, w, kh, kw, top, left, ph, pw, torch.float64)
        g = torch.randn(n * c, ph * pw, dtype=torch.float64)
        up = (g @ k.t()).view(n, c, h, w)
        assert torch.equal(up, _loop_unpool(g.view(n, c, ph, pw), h, w, kh, kw, top, left))
    else:
        assert sums is None  # neither the tiny path nor (disabled) native kernels apply


@needs_native
@pytest.mark.parametrize("w,top,left", [(1024, 1, 2), (1027, -2, 0)])  # aligned rows / mostly not
def test_native_unpool_streams_large_outputs_exactly(w, top, left):
    """Outputs of ≥ 32 MiB take the streaming-store path; off-grid rows and columns stay zero."""
    c, h, kh, kw = 4, 2048, 4, 3
    ph, pw = (h + top) // kh - 1, -(-(w + left) // kw)  # the grid stops short of the last rows
    g = torch.randn(1, c, ph, pw)
    with native.use_native(True):
        up = native.unpool(g, h, w, kh, kw, top, left)
    assert up.numel() * 4 >= 32 << 20
    # oracle: gather from g padded with a zero row and column, off-grid positions point at them
    padded = torch.nn.functional.pad(g, (0, 1, 0, 1))
    rows, cols = torch.arange(h) + top, torch.arange(w) + left
    rows = torch.where((rows >= 0) & (rows < ph * kh), rows // kh, ph)
    cols = torch.where((cols >= 0) & (cols < pw * kw), cols // kw, pw)
    assert torch.equal(up, padded[:, :, rows][:, :, :, cols])
    assert up[:, :, -kh:].abs().sum() == 0


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_low_precision_accumulates_in_float(dtype):
    x = torch.full((1, 2, 64, 64), 0.01, dtype=dtype)
    with native.use_native(True):
        sums = native.patch_sum(x, 16, 16, 0, 0, 4, 4)
    # 256 additions of 0.01: a bf16 accumulator would stall well below 2.56
    torch.testing.assert_close(sums.float(), torch.full((1, 2, 4, 4), 2.56), rtol=2e-2, atol=0)


@needs_native
def test_native_rejects_bad_input_with_one_clear_error():
    with native.use_native(True):
        with pytest.raises(RuntimeError, match="expected a 4-D tensor"):
            native.patch_sum(torch.zeros(3, 4, 5), 2, 2, 0, 0, 2, 2)
        with pytest.raises(RuntimeError, match="patch length along height must be >= 1"):
            native.unpool(torch.zeros(1, 1, 2, 2), 4, 4, 0, 2, 0, 0)
        gy, w = torch.zeros(2, 3, 8, 8), torch.zeros(3, 5, 3, 3)
        grid, args = (4, 4, 0, 0, 2, 2), ((4, 4, 0, 0), (8, 8), 1 / 16, None, True, True)
        with pytest.raises(RuntimeError, match=r"xt must be \(N, Cin, Ph, Pw\)"):
            native.filtered_backward(gy, torch.zeros(5, 2, 2, 2), w, (3, 3), grid, *args)
        with pytest.raises(RuntimeError, match="weight has 4 output channels, gy 3"):
            native.filtered_backward(gy, torch.zeros(2, 5, 2, 2), torch.zeros(4, 5, 3, 3), (3, 3),
                                     grid, *args)


def test_policy_variable_is_validated(monkeypatch):
    monkeypatch.setenv("GRADFILTER_NATIVE", "maybe")
    with pytest.raises(ValueError, match="GRADFILTER_NATIVE must be auto, 0 or 1"):
        native.available()
    monkeypatch.setenv("GRADFILTER_NATIVE", "0")
    assert native.available() is False
    with pytest.raises(RuntimeError, match="disabled"):
        native.patch_sum(torch.zeros(1, 1, 2, 2), 2, 2, 0, 0, 1, 1)


def test_policy_follows_the_variable_as_it_changes(monkeypatch):
    """The policy is read live (from os.environ's own mapping): every change counts, an
    invalid value raises each time it is read."""
    for value, want in (("0", "0"), (" 1 ", "1"), ("AUTO", "auto"), ("0", "0")):
        monkeypatch.setenv("GRADFILTER_NATIVE", value)
        assert native._policy() == want
    monkeypatch.delenv("GRADFILTER_NATIVE")
    assert native._policy() == "auto"
    monkeypatch.setenv("GRADFILTER_NATIVE", "maybe")
    for _ in range(2):
        with pytest.raises(ValueError, match="got 'maybe'"):
            native._policy()
    with native.use_native(False):
        assert native._policy() == "0"


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise OSError("no compiler")

    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setitem(native._state, "loaded", None)
    monkeypatch.setitem(native._state, "error", None)
    monkeypatch.setenv("GRADFILTER_NATIVE", "auto")
    with pytest.warns(native.NativeBuildWarning, match="no compiler"):
        assert native.available() is False
    # the filtered conv still works (pure-PyTorch path) and gives the same gradient
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    GF.conv2d(x, w, padding=1, radius=2).sum().backward()
    assert x.grad is not None and torch.isfinite(w.grad).all()
    monkeypatch.setenv("GRADFILTER_NATIVE", "1")
    with pytest.raises(RuntimeError, match="failed to build: no compiler"):
        native.available()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_allocator_tuning_reaches_child_processes():
    code = ("import os, gradfilter; ok = gradfilter.tune_cpu_allocator(); "
            "import subprocess, sys; print(ok, subprocess.run([sys.executable, '-c', "
            "'import os; print(os.environ.get(\"MALLOC_MMAP_MAX_\"))'], capture_output=True, "
            "text=True).stdout.strip())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["True", "0"]


@needs_native
@pytest.mark.parametrize("upper", [None, 6.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 7, 8, 1024, 1029, 5000])
@pytest.mark.usefixtures("simd")
def test_native_masked_activation_is_pytorch_bit_for_bit(upper, dtype, numel):
    from gradfilter import lean

    x = torch.randn(numel, dtype=dtype) * 5
    x[: min(numel, 6)] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 6.0,
                                       -0.0])[: min(numel, 6)].to(dtype)
    with native.use_native(True):
        y, bits = native.masked_clamp(x, float("inf") if upper is None else upper)
        g = torch.randn(numel, dtype=dtype)
        gx = native.mask_apply(g, bits)
    ref = torch.relu(x) if upper is None else torch.clamp(x, 0.0, upper)
    mask = ref > 0 if upper is None else (x > 0) & (x < upper)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y[~y.isnan()], ref[~ref.isnan()])
    assert torch.equal(bits, lean.pack_bits(mask))  # the pure-PyTorch packing, same layout
    assert torch.equal(gx, g.masked_fill(~mask, 0))
    with pytest.raises(RuntimeError, match="mask bytes for"):
        native.mask_apply(torch.zeros(numel + 8, dtype=dtype), bits)


@needs_native
@pytest.mark.parametrize("count_u8", [True, False])
def test_native_four_lane_paths_equal_the_portable_paths_bit_for_bit(count_u8):
    """The 4-lane vector paths (native.use_simd(1): SSE2 on x86, NEON on AArch64) keep the
    portable paths' order of every sum, and each multiply and add rounds on its own (the build
    does not contract them into FMAs): on any CPU they give the portable paths' results bit for
    bit. (Both are checked against oracles elsewhere; this pins the ISA-independence.)"""
    gen = torch.Generator().manual_seed(int(count_u8))
    x = torch.randn(3000, generator=gen) * 5
    x[:4] = torch.tensor([float("nan"), 0.0, -0.0, 6.0])
    g = torch.randn(13, 37, generator=gen)  # 37 columns: 4 blocks of 8 and a tail
    count = torch.randint(0, 17, (13, 37), generator=gen)
    unit = (g, count.to(torch.uint8) if count_u8 else count.float(),
            torch.randn(13, 37, generator=gen) * 3, torch.randn(13, generator=gen),
            torch.rand(13, generator=gen) + 0.1, torch.randn(13, generator=gen),
            torch.randint(1, 17, (1, 37), generator=gen).float(), 0.25)
    got = {}
    for level in (1, 0):
        with native.use_native(True), native.use_simd(level):
            out = [*native.masked_clamp(x, 6.0), *native.unit_backward(*unit)]
            for n, c, h, w, k in ((2, 16, 7, 7, 4), (2, 9, 20, 23, 3)):  # tiny planes, others
                same = torch.Generator().manual_seed(c)  # the same maps at both levels
                z = torch.randn(n, c, h, w, generator=same) * 4
                scale, shift = torch.randn(c, generator=same) * 1.5, torch.randn(c, generator=same)
                ph, pw = -(-(h + 1) // k), -(-(w + 1) // k)
                out += native.bn_act_stats(z, scale, shift, 6.0, k, 1, 1, ph, pw, count_u8)
        got[level] = out
    assert len(got[1]) == 14
    for a, b in zip(got[1], got[0]):
        assert a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
        if a.is_floating_point():  # the bits, ±0 included
            a, b = a[~a.isnan()].view(torch.int32), b[~b.isnan()].view(torch.int32)
        assert torch.equal(a, b)


@needs_native
@settings(max_examples=60, deadline=None)
@given(grids())
@pytest.mark.usefixtures("simd")
def test_native_channels_last_matches_loops_and_keeps_the_layout(grid):
    n, c, h, w, kh, kw, top, left, ph, pw = grid
    cl = torch.channels_last
    x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=cl)
    g = torch.randn(n, c, ph, pw, dtype=torch.float64).contiguous(memory_format=cl)
    with native.use_native(True):
        sums = native.patch_sum(x, kh, kw, top, left, ph, pw)
        up = native.unpool(g, h, w, kh, kw, top, left)
    torch.testing.assert_close(sums, _loop_patch_sum(x, kh, kw, top, left, ph, pw))
    assert torch.equal(up, _loop_unpool(g, h, w, kh, kw, top, left))
    if not x.is_contiguous():  # channels-last and not also plain (an unambiguous layout)
        assert sums.is_contiguous(memory_format=cl)
    if not g.is_contiguous():
        assert up.is_contiguous(memory_format=cl)


@needs_native
@pytest.mark.parametrize("upper", [None, 6.0])
def test_native_masked_activation_channels_last(upper):
    from gradfilter import lean

    x = (torch.randn(2, 5, 6, 7) * 5).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    gy = torch.randn(2, 5, 6, 7)  # plain layout: the backward must match it to the mask
    op, ref = (lean.relu, torch.relu) if upper is None else (lean.relu6, torch.nn.functional.relu6)
    with native.use_native(True):
        y = op(x)
        (gx,) = torch.autograd.grad(y, x, gy)
    y_ref = ref(x)
    (gx_ref,) = torch.autograd.grad(y_ref, x, gy)
    assert torch.equal(y, y_ref) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gx, gx_ref)


def test_builds_run_the_pip_ninja_first(monkeypatch):
    """Every process builds with the same ninja (see native._ninja_dir); PATH is restored."""
    import torch.utils.cpp_extension as cpp_extension

    seen = {}
    monkeypatch.setattr(native, "_ninja_dir", lambda: "/opt/pip-ninja/bin")
    monkeypatch.setattr(cpp_extension, "load",
                        lambda **kwargs: seen.setdefault("path", os.environ["PATH"]))
    monkeypatch.setenv("PATH", "/usr/bin")
    native._build()
    assert seen["path"].split(os.pathsep)[:2] == ["/opt/pip-ninja/bin", "/usr/bin"]
    assert os.environ["PATH"] == "/usr/bin"

