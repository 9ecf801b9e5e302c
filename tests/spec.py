"""Slow float64 reference of docs/spec.md §2–§6, written with explicit patch and tap loops.

Independent of gradfilter.functional: it shares no code with the fast path and follows the
specification text literally (patch grids, means over real pixels, sums, tap offsets).
"""

from __future__ import annotations

import math

import torch


def _grid(out_size: int, size: int, r: int, s: int):
    """(P, output-grid top padding, input-grid top padding) for one axis."""
    p = math.ceil(out_size / r)
    out_top = math.ceil((p * r - out_size) / 2)
    in_top = math.ceil((p * r * s - size) / 2)
    return p, out_top, in_top


def _tap_offsets(k: int, d: int, r: int, s: int) -> list[int]:
    """Offset, in patches, of each kernel tap: 0 when taps are summed, else (a-(k-1)/2)*d/(r*s)."""
    if k == 1 or d == 1 or d < r * s:
        return [0] * k
    step = d // (r * s)
    assert d % (r * s) == 0 and ((k - 1) * step) % 2 == 0
    return [(a * step - (k - 1) * step // 2) for a in range(k)]


def patch_tensors(x, gy, stride, radius):
    """(ḡ, x̃) of docs/spec.md §4.1 and §3: gy's mean over the real pixels of each output patch,
    and x's sum over
    each stride-scaled input patch, both on the centred grids (float64)."""
    x, gy = x.double(), gy.double()
    n, cin, h, wd = x.shape
    ho, wo = gy.shape[-2:]
    (sh, sw), (rh, rw) = stride, radius
    ph, oth, ith = _grid(ho, h, rh, sh)
    pw, otw, itw = _grid(wo, wd, rw, sw)
    big_h, big_w = rh * sh, rw * sw
    gbar = torch.zeros(n, gy.shape[1], ph, pw, dtype=torch.float64)
    xt = torch.zeros(n, cin, ph, pw, dtype=torch.float64)
    for i in range(ph):
        for j in range(pw):
            r0, r1 = max(i * rh - oth, 0), min((i + 1) * rh - oth, ho)
            c0, c1 = max(j * rw - otw, 0), min((j + 1) * rw - otw, wo)
            gbar[:, :, i, j] = gy[:, :, r0:r1, c0:c1].mean((2, 3))
            r0, r1 = max(i * big_h - ith, 0), min((i + 1) * big_h - ith, h)
            c0, c1 = max(j * big_w - itw, 0), min((j + 1) * big_w - itw, wd)
            if r1 > r0 and c1 > c0:
                xt[:, :, i, j] = x[:, :, r0:r1, c0:c1].sum((2, 3))
    return gbar, xt


def filtered_grads(x, w, gy, stride, dilation, groups, radius):
    """(gx, gW, gb) of the filtered convolution, by the letter of docs/spec.md §2–§6 (2-D,
    float64)."""
    x, w, gy = x.double(), w.double(), gy.double()
    n, cin, h, wd = x.shape
    cout, cpg, kh, kw = w.shape
    ho, wo = gy.shape[-2:]
    (sh, sw), (dh, dw), (rh, rw) = stride, dilation, radius
    ph, oth, ith = _grid(ho, h, rh, sh)
    pw, otw, itw = _grid(wo, wd, rw, sw)
    big_h, big_w = rh * sh, rw * sw
    gbar, xt = patch_tensors(x, gy, stride, radius)

    offs_h, offs_w = _tap_offsets(kh, dh, rh, sh), _tap_offsets(kw, dw, rw, sw)
    scale = 1.0 / (sh * sw)
    opg = cout // groups
    gw = torch.zeros_like(w)
    gxt = torch.zeros(n, cin, ph, pw, dtype=torch.float64)
    for co in range(cout):
        g0 = (co // opg) * cpg
        for ci in range(cpg):
            for a in range(kh):
                for b in range(kw):
                    oa, ob = offs_h[a], offs_w[b]
                    acc = 0.0
                    for i in range(ph):
                        for j in range(pw):
                            ii, jj = i + oa, j + ob
                            if 0 <= ii < ph and 0 <= jj < pw:
                                acc = acc + (gbar[:, co, i, j] * xt[:, g0 + ci, ii, jj]).sum()
                                gxt[:, g0 + ci, ii, jj] += w[co, ci, a, b] * gbar[:, co, i, j]
                    gw[co, ci, a, b] = acc * scale
    gxt *= scale

    gx = torch.zeros_like(x)
    for yy in range(h):
        i = (yy + ith) // big_h
        if not 0 <= i < ph:
            continue
        for xx in range(wd):
            j = (xx + itw) // big_w
            if 0 <= j < pw:
                gx[:, :, yy, xx] = gxt[:, :, i, j]
    return gx, gw, gy.sum((0, 2, 3))
